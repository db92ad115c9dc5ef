//! The workspace's `rust-version` is true: no locked dependency needs a newer Rust, every crate
//! declares it, and clippy checks the code against the same version (`msrv` in clippy.toml; its
//! `incompatible_msrv` lint flags std APIs newer than that).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read_toml(name: &str) -> toml::Table {
    let text = std::fs::read_to_string(root().join(name)).unwrap();
    text.parse()
        .unwrap_or_else(|e| panic!("{name} does not parse: {e}"))
}

/// `1.88` or `1.88.0` as (major, minor, patch).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|e| panic!("bad Rust version {text:?}: {e}"))
    });
    let major = parts.next().unwrap();
    let (minor, patch) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(parts.next().is_none(), "bad Rust version {text:?}");
    (major, minor, patch)
}

/// `[workspace.package] rust-version` in the root Cargo.toml.
fn workspace_msrv() -> String {
    let manifest = read_toml("Cargo.toml");
    manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("Cargo.toml: [workspace.package] rust-version is not set")
        .to_string()
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_the_workspace() {
    let msrv = workspace_msrv();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let out = Command::new(&cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--manifest-path",
        ])
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let packages = meta["packages"].as_array().unwrap();
    assert!(packages.len() > members.len(), "no dependencies in {meta}");

    let mut newer = Vec::new();
    let mut undeclared = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap();
        let declared = p["rust_version"].as_str();
        let label = format!(
            "{name} {} (rust-version {})",
            p["version"].as_str().unwrap(),
            declared.unwrap_or("unset")
        );
        if members.contains(&p["id"].as_str().unwrap()) {
            if declared != Some(msrv.as_str()) {
                undeclared.push(label);
            }
        } else if declared.is_some_and(|v| version(v) > version(&msrv)) {
            newer.push(label);
        }
    }
    assert!(
        newer.is_empty(),
        "locked dependencies need a newer Rust than the workspace's rust-version {msrv} \
         (raise it in Cargo.toml and clippy.toml, or pin older versions in Cargo.lock):\n  {}",
        newer.join("\n  ")
    );
    assert!(
        undeclared.is_empty(),
        "workspace crates must declare the workspace's rust-version {msrv} \
         (rust-version.workspace = true):\n  {}",
        undeclared.join("\n  ")
    );
}

#[test]
fn clippy_checks_the_same_rust_version() {
    let msrv = workspace_msrv();
    let clippy = read_toml("clippy.toml");
    assert_eq!(
        clippy.get("msrv").and_then(|v| v.as_str()),
        Some(msrv.as_str()),
        "clippy.toml's msrv must equal Cargo.toml's rust-version"
    );
    assert_eq!(
        clippy
            .get("check-incompatible-msrv-in-tests")
            .and_then(|v| v.as_bool()),
        Some(true),
        "clippy.toml must check test code against the msrv too"
    );
}
