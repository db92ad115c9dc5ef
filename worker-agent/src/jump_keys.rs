//! `jump_authorized_keys`: the OpenSSH public keys of the people allowed to reach this job
//! through the relay's `ssh -J` listener. The agent sends them in its hello; the relay then lets
//! only those keys (or certificates of those keys) open a channel to this agent, on top of its
//! own jump policy.
//!
//! The file is read at start (a bad file exits 64) and again before every session hello, so an
//! edit takes effect on the agent's next reconnect. Each line is `TYPE BASE64 [comment]`; blank
//! lines and `#` comments are skipped. `authorized_keys` options (`from=`, `restrict`, ...) are
//! refused rather than ignored: the relay could not honour them, and silently dropping a
//! `from="..."` would let the key in from anywhere.

use std::path::Path;

use base64::Engine;
use jumpgate_config::ConfigError;
use jumpgate_proto::{MAX_JUMP_KEYS, MAX_JUMP_KEY_LEN};

/// The setting's name, in errors.
const KEY: &str = "jump_authorized_keys";

/// Reads the keys of `path` as the hello carries them (`TYPE BASE64`, comments dropped); no
/// file: no keys (the relay's policy alone).
pub fn read(path: Option<&Path>) -> Result<Vec<String>, ConfigError> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let invalid = |detail: String| ConfigError::Invalid {
        key: KEY,
        detail: format!("{}: {detail}", path.display()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let keys = parse(&text).map_err(invalid)?;
    if keys.is_empty() {
        return Err(invalid(
            "no keys in the file; add one OpenSSH public key per line (`ssh-ed25519 AAAA... comment`)".into(),
        ));
    }
    Ok(keys)
}

/// Parses the file's text; errors name the line.
fn parse(text: &str) -> Result<Vec<String>, String> {
    let mut keys: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = parse_line(line).map_err(|why| format!("line {}: {why}", n + 1))?;
        if !keys.contains(&key) {
            keys.push(key);
        }
        if keys.len() > MAX_JUMP_KEYS {
            return Err(format!(
                "more than {MAX_JUMP_KEYS} keys; the relay takes at most {MAX_JUMP_KEYS} per agent (use a user CA and certificates for larger teams)"
            ));
        }
    }
    Ok(keys)
}

/// One `TYPE BASE64 [comment]` line as `TYPE BASE64`.
fn parse_line(line: &str) -> Result<String, String> {
    let mut words = line.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err("expected `TYPE BASE64 [comment]`, e.g. `ssh-ed25519 AAAA... alice`".into());
    };
    let known = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-")
        || kind.starts_with("sk-ecdsa-");
    if !known {
        return Err(format!(
            "{:?} is not an OpenSSH key type; authorized_keys options (from=, restrict, ...) are not supported here, remove them",
            jumpgate_proto::sanitize(kind, 40)
        ));
    }
    if kind.contains("-cert-v01@") {
        return Err("a certificate is not a key; list the user's public key itself".into());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "the key's second field is not base64".to_string())?;
    // The blob starts with its own type name (a u32 length and the name), which must match.
    let inner = raw
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
        .and_then(|len| raw.get(4..4usize.checked_add(len)?));
    if inner != Some(kind.as_bytes()) {
        return Err(format!(
            "the key data is not a {:?} key (truncated or mislabelled)",
            jumpgate_proto::sanitize(kind, 40)
        ));
    }
    let key = format!("{kind} {blob}");
    if key.len() > MAX_JUMP_KEY_LEN {
        return Err(format!(
            "key is {} bytes; the relay takes keys of at most {MAX_JUMP_KEY_LEN} (use Ed25519 or ECDSA, or RSA up to 4096 bits)",
            key.len()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEFkwdSamLggRUBgB2UbBTTYQdSHVWWZrGqYU1Ff5QMd";

    #[test]
    fn keys_comments_and_duplicates() {
        let text = format!("# team\n\n{ALICE} alice@laptop\n{ALICE} again\n");
        assert_eq!(parse(&text).unwrap(), vec![ALICE.to_string()]);
    }

    #[test]
    fn options_garbage_and_too_many_are_refused_by_line() {
        let err = parse(&format!("{ALICE}\nrestrict {ALICE}\n")).unwrap_err();
        assert!(
            err.starts_with("line 2:") && err.contains("options"),
            "{err}"
        );
        let err = parse("ssh-ed25519 !!!\n").unwrap_err();
        assert!(err.contains("not base64"), "{err}");
        let err =
            parse("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIEFkwdSamLggRUBgB2UbBTTYQdSHVWWZrGqYU1Ff5QMd\n")
                .unwrap_err();
        assert!(err.contains("not a \"ssh-rsa\" key"), "{err}");
        // 33 distinct well-formed keys.
        let many: String = (0..=MAX_JUMP_KEYS as u8)
            .map(|i| {
                let mut blob = b"\0\0\0\x0bssh-ed25519\0\0\0\x20".to_vec();
                blob.extend([i; 32]);
                format!(
                    "ssh-ed25519 {}\n",
                    base64::engine::general_purpose::STANDARD.encode(blob)
                )
            })
            .collect();
        let err = parse(&many).unwrap_err();
        assert!(err.contains("more than 32 keys"), "{err}");
    }
}
