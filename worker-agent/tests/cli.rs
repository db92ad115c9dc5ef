//! The agent's command line: configuration mistakes exit 64 and say how to fix them.
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

use assert_cmd::Command;

fn agent() -> Command {
    Command::cargo_bin("worker-agent").unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A token file readable by its owner only, as the agent requires.
fn token(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("token");
    std::fs::write(&p, "agent-secret-token\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

const PIN: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[test]
fn missing_trust_exits_64_and_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args(["check-config", "--server", "relay:7000", "--name", "w"])
        .arg("--token-file")
        .arg(token(dir.path()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("relay-server fingerprint"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_service_spec_and_server_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path());
    let out = agent()
        .args([
            "check-config",
            "--server",
            "relay:7000",
            "--fingerprint",
            PIN,
            "--service",
            "ssh:22",
        ])
        .arg("--token-file")
        .arg(&tok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("NAME=HOST:PORT"), "{}", stderr(&out));
    let out = agent()
        .args(["check-config", "--server", "relay", "--fingerprint", PIN])
        .arg("--token-file")
        .arg(&tok)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("HOST:PORT"), "{}", stderr(&out));
}

#[test]
fn check_config_masks_the_token_and_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "server = \"relay.example.com:7000\"\nname = \"vh-exec-1\"\ntoken_file = \"{}\"\nfingerprint = \"{PIN}\"\n\
             [[service]]\nname = \"ssh\"\ntarget = \"127.0.0.1:22\"\npreferred_port = 12345\n",
            token(dir.path()).display()
        ),
    )
    .unwrap();
    let out = agent()
        .arg("check-config")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vh-exec-1") && text.contains("12345"),
        "{text}"
    );
    assert!(!text.contains("agent-secret-token"), "{text}");
}

#[test]
fn token_from_environment_is_accepted() {
    let out = agent()
        .args([
            "check-config",
            "--server",
            "relay:7000",
            "--name",
            "w",
            "--fingerprint",
            PIN,
        ])
        .env("JUMPGATE_TOKEN", "env-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("env-token"));
}

#[test]
fn log_level_is_a_flag_and_a_key_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let tok = token(dir.path());
    let check = |extra: &[&str], file: Option<&str>| {
        let mut cmd = agent();
        cmd.args(["check-config", "--server", "relay:7000", "--name", "w"])
            .args(["--fingerprint", PIN])
            .arg("--token-file")
            .arg(&tok)
            .args(extra);
        if let Some(text) = file {
            let cfg = dir.path().join("agent.toml");
            std::fs::write(&cfg, text).unwrap();
            cmd.arg("-c").arg(cfg);
        }
        cmd.output().unwrap()
    };
    let out = check(&[], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("log_level: \"info\""));
    let out = check(&[], Some("log_level = \"debug\"\n"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("log_level: \"debug\""));
    let out = check(
        &["--log-level", "info,worker_agent=trace"],
        Some("log_level = \"debug\"\n"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("log_level: \"info,worker_agent=trace\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = check(&["--log-level", "info,worker_agent=loud"], None);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("invalid log_level"),
        "{}",
        stderr(&out)
    );
}
