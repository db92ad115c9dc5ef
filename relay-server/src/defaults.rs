//! Default listen addresses, in a module of their own: the configuration applies them and a
//! bind error names them ("this is the default"), and `error` must not import `config` (which
//! imports the lease store, which imports `error`).

/// Default admin endpoint.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7001";

/// Default agent port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7000";
