//! Files: scratch directories, random payloads and their hashes, secrets, command output.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use sha2::{Digest, Sha256};

/// A scratch directory for one test.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("jumpgate-e2e-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes `len` pseudo-random bytes to `path` and returns their SHA-256.
pub fn random_file(path: &Path, len: usize) -> String {
    let mut f = fs::File::open("/dev/urandom").unwrap();
    let mut data = vec![0u8; len];
    f.read_exact(&mut data).unwrap();
    fs::write(path, &data).unwrap();
    hex(&Sha256::digest(&data))
}

/// SHA-256 of a file's content, hex.
pub fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts an ssh command succeeded and returns its stdout.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A line-count-free check: how many times `needle` appears in `text`.
pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Writes a relay tokens file (0600) with one `[[token]]` per `(label, token, agent pattern)`.
pub fn tokens_file(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    let path = dir.join("tokens.toml");
    let body: String = entries
        .iter()
        .map(|(label, token, agents)| {
            format!(
                "[[token]]\nlabel = \"{label}\"\ntoken = \"{token}\"\nagents = [\"{agents}\"]\n\n"
            )
        })
        .collect();
    write_secret(&path, &body);
    path
}

/// Writes a secret file the way both binaries require it: readable by its owner only.
pub fn write_secret(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}
