//! The example configs in examples/ stay valid: each passes `check-config`.

use std::process::Command;

use jumpgate_tests::*;

#[test]
fn example_configs_pass_check_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = Command::new(bin("relay-server"))
        .arg("check-config")
        .arg("-c")
        .arg(root.join("examples/relay.toml"))
        .output()
        .unwrap();
    assert!(ok_stdout(&out).contains("54.123.45.67"));

    // The agent example names /etc/jumpgate/token; point it at a real file for the check.
    let dir = scratch();
    let token = dir.path().join("token");
    std::fs::write(&token, "example-token\n").unwrap();
    let text = std::fs::read_to_string(root.join("examples/agent.toml")).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        text.replace("/etc/jumpgate/token", token.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(bin("worker-agent"))
        .arg("check-config")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    let shown = ok_stdout(&out);
    assert!(
        shown.contains("tensorboard") && !shown.contains("example-token"),
        "{shown}"
    );
}
