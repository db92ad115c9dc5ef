//! SOCKS5 to a proxy (tokio-socks): `socks5://` resolves the relay's name here, `socks5h://`
//! lets the proxy resolve it; username/password auth when a user is given.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};

use super::url::Scheme;
use super::Proxy;

/// Asks a SOCKS5 proxy for the relay; `socks5://` resolves the name here first.
pub(super) async fn connect_socks<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: S,
    proxy: &Proxy,
    host: &str,
    port: u16,
    addr: Option<SocketAddr>,
) -> Result<S, String> {
    use tokio_socks::tcp::Socks5Stream;
    use tokio_socks::TargetAddr;
    let target: TargetAddr<'_> = match (addr, proxy.url.scheme) {
        (Some(a), _) => TargetAddr::Ip(a),
        (None, Scheme::Socks5) => {
            let a = tokio::net::lookup_host((host, port))
                .await
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    format!("cannot resolve {host} here (socks5h:// lets the proxy resolve it)")
                })?;
            TargetAddr::Ip(a)
        }
        (None, _) => match host.parse::<IpAddr>() {
            Ok(ip) => TargetAddr::Ip(SocketAddr::new(ip, port)),
            Err(_) => TargetAddr::Domain(host.into(), port),
        },
    };
    let shown = match &target {
        TargetAddr::Ip(a) => a.to_string(),
        TargetAddr::Domain(d, p) => format!("{d}:{p}"),
    };
    let result = match &proxy.url.user {
        Some(user) => {
            let pass = proxy.password.as_ref().map_or("", |p| p.expose());
            Socks5Stream::connect_with_password_and_socket(tcp, target, user, pass).await
        }
        None => Socks5Stream::connect_with_socket(tcp, target).await,
    };
    match result {
        Ok(stream) => Ok(stream.into_inner()),
        Err(tokio_socks::Error::PasswordAuthFailure(code)) => Err(format!(
            "rejected the user name and password (SOCKS5 status {code}): check the user in the proxy URL and the password in proxy_password_file"
        )),
        Err(tokio_socks::Error::NoAcceptableAuthMethods) => Err(
            "accepts none of the offered authentication methods: give the user in the proxy URL and a password file".into(),
        ),
        Err(e) => Err(format!("refused to connect to {shown}: {e}")),
    }
}
