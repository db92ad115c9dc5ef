//! The example configs in examples/ stay valid: each passes `check-config`; the README's list of
//! what CI installs is the script's.

use std::os::unix::fs::PermissionsExt;
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

    // The agent example takes its token from the systemd credential `token`, as its unit gives it.
    let dir = scratch();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let token = credentials.join("token");
    std::fs::write(&token, "example-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o400)).unwrap();
    std::fs::set_permissions(&credentials, std::fs::Permissions::from_mode(0o500)).unwrap();
    let out = Command::new(bin("worker-agent"))
        .arg("check-config")
        .arg("-c")
        .arg(root.join("examples/agent.toml"))
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env_remove("JUMPGATE_TOKEN")
        .output()
        .unwrap();
    let shown = ok_stdout(&out);
    assert!(
        shown.contains("tensorboard") && !shown.contains("example-token"),
        "{shown}"
    );
}

/// The Debian packages the README says `.ci/run` installs are the ones its `apt-get install`
/// line names, in the same order.
#[test]
fn the_readme_lists_the_packages_ci_installs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let words = |text: &str| {
        text.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let script = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let install = script
        .split("--no-install-recommends")
        .nth(1)
        .and_then(|rest| rest.split(">/dev/null").next())
        .expect(".ci/run has an apt-get install --no-install-recommends ... >/dev/null line")
        .replace('\\', " ");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let listed = readme
        .split("it installs `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .expect("README.md says what .ci/run \"installs `...`\"");
    assert_eq!(words(listed), words(&install));
}
