use super::*;
use std::path::Path;

#[test]
fn netns_service_specs() {
    let s = ServiceSpec::parse("ssh=127.0.0.1:22@12345!,netns=job7").unwrap();
    assert_eq!(s.netns.as_deref(), Some(Path::new("/run/netns/job7")));
    assert_eq!((s.preferred_port, s.strict), (Some(12345), true));
    let s = ServiceSpec::parse("ssh=10.0.0.5:22,netns=/proc/42/ns/net").unwrap();
    assert_eq!(s.netns.as_deref(), Some(Path::new("/proc/42/ns/net")));
    for (bad, says) in [
        ("ssh=127.0.0.1:22,netns=", "netns is empty"),
        ("ssh=127.0.0.1:22,netns=a,netns=b", "twice"),
        ("ssh=127.0.0.1:22,color=red", "unknown option"),
        ("ssh=sshd.local:22,netns=job7", "must be IP:PORT"),
        ("ssh=127.0.0.1:22,netns=proc/1/ns/net", "absolute"),
    ] {
        let e = ServiceSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("netns=NS"), "{bad}: {e}");
    }
}

#[test]
fn service_specs() {
    let s = ServiceSpec::parse("ssh=127.0.0.1:22@12345!").unwrap();
    assert_eq!(
        (s.target_port, s.preferred_port, s.strict),
        (22, Some(12345), true)
    );
    let s = ServiceSpec::parse("web=[::1]:8080").unwrap();
    assert_eq!((s.target_port, s.preferred_port), (8080, None));
    for bad in [
        "ssh",
        "ssh=host",
        "ssh=h:0",
        "-x=h:1",
        "ssh=h:22@x",
        "ssh=h:22@0",
    ] {
        let e = ServiceSpec::parse(bad).unwrap_err().to_string();
        assert!(e.contains("NAME=HOST:PORT"), "{bad}: {e}");
    }
}

/// A token file as it should be: readable by its owner only.
fn token(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.path().join("token");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Like the relay, the agent refuses a token others can read, and says how to fix it.
#[test]
fn a_token_file_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tok = token(&dir, "tok-secret-value\n");
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = AgentConfig::from_args(RunArgs {
        token_file: Some(tok.clone()),
        ..args()
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("invalid token_file") && e.contains(&format!("chmod 600 {}", tok.display())),
        "{e}"
    );
    assert!(!e.contains("tok-secret-value"));
}

fn args() -> RunArgs {
    RunArgs {
        server: vec!["relay:7000".into()],
        name: Some("w1".into()),
        fingerprint: vec![format!("sha256:{}", "ab".repeat(32))],
        ..RunArgs::default()
    }
}

#[test]
fn trust_is_required_and_token_masked() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(&dir, "tok-secret-value\n");
    let mut a = args();
    a.token_file = Some(tok);
    let c = AgentConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.services[0].target, "127.0.0.1:22");
    assert!(!format!("{c:?}").contains("tok-secret-value"));
    a.fingerprint.clear();
    let e = AgentConfig::from_args(a).unwrap_err().to_string();
    assert!(e.contains("--fingerprint"), "{e}");
}

#[test]
fn fleet_settings_have_defaults_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.token_file = Some(token(&dir, "t\n"));
    let c = AgentConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.member_grace, std::time::Duration::from_secs(60));
    assert_eq!(c.max_relays, 16);
    a.member_grace = Some("2s".parse().unwrap());
    a.max_relays = Some(3);
    let c = AgentConfig::from_args(a.clone()).unwrap();
    assert_eq!(c.member_grace, std::time::Duration::from_secs(2));
    assert_eq!(c.max_relays, 3);
    a.max_relays = Some(0);
    let e = AgentConfig::from_args(a).unwrap_err().to_string();
    assert!(e.contains("max_relays"), "{e}");
}

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn flag_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(&dir, "t\n");
    let mut a = args();
    a.server.clear();
    a.token_file = Some(tok);
    a.config = Some(write(
        &dir,
        "server = [\"r1:7000\", \"r2:7000\"]\nname = \"from-file\"\nmax_lanes = 3\n\
         log_level = \"debug\"\nno_port = true\n\
         [[service]]\nname = \"web\"\ntarget = \"127.0.0.1:80\"\nallow_cidr = [\"10.0.0.0/8\"]\n",
    ));
    a.max_lanes = Some(5);
    let c = AgentConfig::from_args(a.clone()).unwrap();
    // Flag over file.
    assert_eq!(c.name, "w1");
    assert_eq!(c.max_lanes, 5);
    // File over default.
    assert_eq!(c.servers.len(), 2);
    assert_eq!(c.log_level, "debug");
    assert_eq!(c.services.len(), 1);
    assert_eq!(
        (c.services[0].name.as_str(), c.services[0].no_port),
        ("web", true)
    );
    assert_eq!(c.services[0].allow.len(), 1);
    // Default where neither says.
    assert_eq!((c.worker_threads, c.log_format), (1, LogFormat::Text));
    // Flag lists replace the file's.
    a.service = vec!["ssh=127.0.0.1:2222".parse().unwrap()];
    a.server = vec!["r3:7000".into()];
    let c = AgentConfig::from_args(a).unwrap();
    assert_eq!(
        c.servers,
        [ServerAddr {
            host: "r3".into(),
            port: 7000
        }]
    );
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.services[0].target_port, 2222);
    let c = AgentConfig::from_args(RunArgs {
        token_file: c.token.is_some().then(|| dir.path().join("token")),
        ..args()
    })
    .unwrap();
    assert_eq!(c.log_level, "info");
    assert_eq!(c.max_lanes, 8);
}

#[test]
fn unknown_keys_are_named_also_in_service_tables() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args();
    a.config = Some(write(&dir, "servr = \"r:1\"\n"));
    let e = AgentConfig::from_args(a.clone()).unwrap_err().to_string();
    assert!(e.contains("servr"), "{e}");
    a.config = Some(write(
        &dir,
        "[[service]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22\"\nprefered_port = 1\n",
    ));
    let e = AgentConfig::from_args(a.clone()).unwrap_err().to_string();
    assert!(e.contains("prefered_port"), "{e}");
    let tok = token(&dir, "t\n");
    a.token_file = Some(tok);
    a.config = Some(write(&dir, "log_level = \"info,worker_agent=loud\"\n"));
    let e = AgentConfig::from_args(a).unwrap_err().to_string();
    assert!(e.starts_with("invalid log_level"), "{e}");
}
