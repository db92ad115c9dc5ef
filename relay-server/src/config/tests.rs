use super::*;
use jumpgate_config::ConfigError;
use jumpgate_proto::Cidr;

fn args() -> RunArgs {
    RunArgs {
        port_range: Some("10000-10010".into()),
        public_host: Some("relay.example".into()),
        ..RunArgs::default()
    }
}

#[test]
fn defaults() {
    let c = RelayConfig::from_args(args()).unwrap();
    assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
    assert_eq!(c.lease_ttl, Duration::from_secs(86400));
    assert_eq!(c.tls, TlsSource::SelfSigned);
    // Loopback and data-centre agents keep one connection.
    assert_eq!(c.lanes_min_rtt, Duration::ZERO);
}

#[test]
fn flags_override_file_and_unknown_keys_fail() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("relay.toml");
    std::fs::write(&p, "listen = \"127.0.0.1:1\"\nlease_ttl = \"2h\"\n").unwrap();
    let mut a = args();
    a.config = Some(p.clone());
    a.listen = Some("127.0.0.1:2".into());
    let c = RelayConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.listen.port(), 2);
    assert_eq!(c.lease_ttl, Duration::from_secs(7200));

    std::fs::write(&p, "port_rnage = \"1-2\"\n").unwrap();
    let err = RelayConfig::from_args(a).unwrap_err().to_string();
    assert!(err.contains("port_rnage"), "{err}");
}

#[test]
fn bad_values_name_their_key() {
    let mut a = args();
    a.port_range = Some("50000-10000".into());
    assert!(RelayConfig::from_args(a)
        .unwrap_err()
        .to_string()
        .contains("port_range"));
    let mut a = args();
    a.heartbeat_timeout = Some("5s".into());
    assert!(RelayConfig::from_args(a)
        .unwrap_err()
        .to_string()
        .contains("heartbeat_timeout"));
    let mut a = args();
    a.tls_cert = Some("c.pem".into());
    assert!(RelayConfig::from_args(a)
        .unwrap_err()
        .to_string()
        .contains("tls_key"));
    let mut a = args();
    a.public_host = None;
    assert!(RelayConfig::from_args(a)
        .unwrap_err()
        .to_string()
        .contains("public_host"));
}

#[test]
fn websocket_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.config = Some(write(
        &dir,
        "ws_trusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\nws_public_url = \"wss://relay.example.com/jumpgate\"\n",
    ));
    let c = RelayConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.ws_trusted_proxies.len(), 2);
    assert_eq!(
        c.ws_public_url.as_deref(),
        Some("wss://relay.example.com/jumpgate")
    );
    let c = RelayConfig::from_args(args()).unwrap();
    assert!(c.ws_trusted_proxies.is_empty() && c.ws_public_url.is_none());
    for bad in [
        "https://relay.example.com/j",
        "wss://u@relay/j",
        "wss://relay/j?x",
    ] {
        let mut a = args();
        a.ws_public_url = Some(bad.into());
        let err = RelayConfig::from_args(a).unwrap_err().to_string();
        assert!(err.contains("ws_public_url"), "{err}");
    }
    let mut a = args();
    a.ws_trusted_proxies = vec!["nginx".into()];
    let err = RelayConfig::from_args(a).unwrap_err().to_string();
    assert!(err.contains("ws_trusted_proxies"), "{err}");
}

#[test]
fn advertise_and_peers_are_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.config = Some(write(
        &dir,
        "peers = [\"relay-b.example:7000\", \" [fd00::2]:7000\", \"relay.example:7000\", \"relay-b.example:7000\"]\n",
    ));
    let c = RelayConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.advertise, None);
    assert_eq!(c.advertised(7000), "relay.example:7000");
    assert_eq!(
        c.peers,
        ["relay-b.example:7000", "[fd00::2]:7000"],
        "itself and repeats dropped"
    );
    a.peers = vec!["relay-c.example:7000  wss://relay-c.example/jumpgate".into()];
    let c = RelayConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.peers, ["relay-c.example:7000"]);
    assert_eq!(
        c.peer_ws.get("relay-c.example:7000").map(String::as_str),
        Some("wss://relay-c.example/jumpgate")
    );
    a.peers = vec!["relay-c.example:7000 https://relay-c.example/".into()];
    let err = RelayConfig::from_args(a.clone()).unwrap_err().to_string();
    assert!(err.contains("HOST:PORT wss://HOST/PATH"), "{err}");
    a.peers = Vec::new();
    a.advertise = Some("relay-a.example:7100".into());
    assert_eq!(
        RelayConfig::from_args(a.clone()).unwrap().advertised(7000),
        "relay-a.example:7100"
    );
    for (key, bad) in [("advertise", "relay-a.example"), ("peers", "x y:7000")] {
        let mut b = args();
        match key {
            "advertise" => b.advertise = Some(bad.into()),
            _ => b.peers = vec![bad.into()],
        }
        let err = RelayConfig::from_args(b).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
            "{err}"
        );
    }
    let mut b = args();
    b.public_host = Some("bad/host".into());
    assert!(RelayConfig::from_args(b)
        .unwrap_err()
        .to_string()
        .contains("advertise"));
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("relay.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn flag_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.config = Some(write(
        &dir,
        "drain_timeout = 20\nheartbeat_interval = \"5s\"\nallow_cidr = [\"10.0.0.0/8\"]\n\
         max_conns_per_port = 7\nlog_level = \"debug\"\nworker_threads = 2\n",
    ));
    a.drain_timeout = Some("3s".into());
    a.max_conns_per_port = Some(9);
    let c = RelayConfig::from_args(a.clone()).unwrap();
    // Flag over file.
    assert_eq!(c.drain_timeout, Duration::from_secs(3));
    assert_eq!(c.max_conns_per_port, 9);
    // File over default (a duration may be plain seconds or text).
    assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(c.allow_cidr, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
    assert_eq!((c.log_level.as_str(), c.worker_threads), ("debug", 2));
    // Default where neither says.
    assert_eq!(c.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(c.max_handshakes, 1024);
    assert_eq!(c.admin, Some(DEFAULT_ADMIN.parse().unwrap()));
    // A repeated flag replaces the file's list.
    a.allow_cidr = vec!["192.0.2.0/24".into(), "198.51.100.0/24".into()];
    let c = RelayConfig::from_args(a).unwrap();
    assert_eq!(c.allow_cidr.len(), 2);
    assert_eq!(c.allow_cidr[0], "192.0.2.0/24".parse::<Cidr>().unwrap());
    // The file's integer seconds are read as such.
    let mut b = args();
    b.config = Some(write(&dir, "drain_timeout = 20\n"));
    assert_eq!(
        RelayConfig::from_args(b).unwrap().drain_timeout,
        Duration::from_secs(20)
    );
}

#[test]
fn bad_values_name_their_key_from_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.lease_ttl = Some("soon".into());
    let from_flag = RelayConfig::from_args(a).unwrap_err().to_string();
    let mut a = args();
    a.config = Some(write(&dir, "lease_ttl = \"soon\"\n"));
    let from_file = RelayConfig::from_args(a).unwrap_err().to_string();
    assert!(from_flag.starts_with("invalid lease_ttl: "), "{from_flag}");
    assert_eq!(from_flag, from_file);

    let mut a = args();
    a.config = Some(write(&dir, "max_handshakes = \"many\"\n"));
    let err = RelayConfig::from_args(a).unwrap_err().to_string();
    assert!(err.contains("max_handshakes"), "{err}");
    // A key that exists only as a flag is unknown in the file.
    let mut a = args();
    a.config = Some(write(&dir, "config = \"other.toml\"\n"));
    let err = RelayConfig::from_args(a).unwrap_err().to_string();
    assert!(err.contains("unknown field `config`"), "{err}");
}

/// Every purpose (and so every subcommand, and reload, which re-runs `from_args`) refuses a
/// certificate without its key, with the same message, whether flag or file gave it.
#[test]
fn a_certificate_without_key_is_refused_for_every_purpose() {
    let dir = tempfile::tempdir().unwrap();
    let expected = RelayConfig::from_args(RunArgs {
        tls_cert: Some("c.pem".into()),
        ..args()
    })
    .unwrap_err()
    .to_string();
    assert!(
        expected.contains("give both --tls-cert and --tls-key"),
        "{expected}"
    );
    let from_file = RunArgs {
        config: Some(write(&dir, "tls_cert = \"c.pem\"\n")),
        ..RunArgs::default()
    };
    let key_only = RunArgs {
        tls_key: Some("k.pem".into()),
        ..RunArgs::default()
    };
    for args in [from_file.clone(), key_only] {
        let err = RelayConfig::load(args, Purpose::Inspect).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }
    let mut run = args();
    run.config = from_file.config;
    assert_eq!(
        RelayConfig::from_args(run).unwrap_err().to_string(),
        expected
    );
}

#[test]
fn lease_store_settings_refuse_a_password_in_the_url_and_pick_tls_by_host() {
    let pg = |url: &str, tls: Option<&str>| {
        RelayConfig::from_args(RunArgs {
            lease_store: Some("postgres".into()),
            lease_store_url: Some(url.into()),
            lease_store_tls: tls.map(str::to_string),
            ..args()
        })
    };
    let err = pg("postgres://jg:hunter2@db.example/jumpgate", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lease_store_password_file"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = pg("host=db.example user=jg password=hunter2", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("carries a password") && !err.contains("hunter2"),
        "{err}"
    );
    let tls_of = |c: RelayConfig| match c.lease_store {
        LeaseStoreConfig::Postgres(s) => s.tls,
        LeaseStoreConfig::File => panic!("file store"),
    };
    use crate::leases::StoreTls;
    assert_eq!(
        tls_of(pg("postgres://jg@db.example/jumpgate", None).unwrap()),
        StoreTls::Require
    );
    assert_eq!(
        tls_of(pg("postgres://jg@127.0.0.1:5432/jumpgate", None).unwrap()),
        StoreTls::Disable
    );
    assert_eq!(
        tls_of(pg("postgres://jg@127.0.0.1/jumpgate", Some("require")).unwrap()),
        StoreTls::Require
    );
    assert!(pg("postgres://jg@db.example/jumpgate", Some("maybe"))
        .unwrap_err()
        .to_string()
        .contains("lease_store_tls"));
    let err = RelayConfig::from_args(RunArgs {
        lease_store: Some("postgres".into()),
        ..args()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("lease_store_url"), "{err}");
    let c = RelayConfig::from_args(RunArgs {
        listen: Some("127.0.0.2:7000".into()),
        ..args()
    })
    .unwrap();
    assert!(matches!(c.lease_store, LeaseStoreConfig::File));
    assert!(c.relay_id.ends_with("/127.0.0.2:7000"), "{}", c.relay_id);
    assert_eq!(c.advertised(7000), "relay.example:7000");
}

#[test]
fn inspecting_needs_no_port_range_or_public_host() {
    let c = RelayConfig::load(RunArgs::default(), Purpose::Inspect).unwrap();
    assert_eq!(c.public_host, UNKNOWN_PUBLIC_HOST);
    assert_eq!(c.tls, TlsSource::SelfSigned);
    assert_eq!(c.router_address(), None);
    let c = RelayConfig::load(
        RunArgs {
            router_listen: Some("0.0.0.0:7443".into()),
            public_host: Some("relay.example".into()),
            ..RunArgs::default()
        },
        Purpose::Inspect,
    )
    .unwrap();
    assert_eq!(c.router_address().as_deref(), Some("relay.example:7443"));
    // Running still requires them.
    let err = RelayConfig::from_args(RunArgs::default()).unwrap_err();
    assert!(err.to_string().contains("port_range"), "{err}");
}
