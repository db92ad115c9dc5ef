//! Signed join tokens: per-job credentials a platform mints without touching the relay.
//!
//! A join token is a JWT signed with Ed25519 (`alg: EdDSA`) by a key the platform keeps; the
//! relay holds only the public key (`join_key_file`). A token is accepted only when:
//!
//! - its `aud` is this fleet's audience (`join_audience`, default `jumpgate:PUBLIC_HOST`), so a
//!   token minted for another fleet, or any other JWT the platform signs with the same key, is
//!   refused; and its `iss` is `join_issuer` when one is set;
//! - it has an `exp`, is inside `nbf`..`exp` (with [`LEEWAY_SECS`] of clock difference), and
//!   lives at most `join_max_lifetime` (default 7 days), counted from `iat`/`nbf`, and from now;
//! - its `sub` is one agent name or a `prefix-*` pattern naming a non-empty prefix (never `*`),
//!   and covers the name the agent claims.
//!
//! It is checked whenever an agent connects or reconnects; a session in progress is not cut when
//! its token expires, but it is cut when a reload (SIGHUP) finds another join key in the file:
//! rotating the key revokes what the old key signed. The subject is the session's identity: a
//! token for one job cannot take over another job's name, even where both tokens would be valid.
//! Any JWT library can mint one; operators can use `relay-server mint-token`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use jumpgate_config::ConfigError;
use jumpgate_proto::{Refusal, Secret};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::claims::NamePattern;

/// Clock difference tolerated between the platform that mints and the relay that checks: a few
/// seconds, so an expired token is refused when it expires, not a minute later.
pub(crate) const LEEWAY_SECS: u64 = 5;

/// Longest lifetime a token may have unless `join_max_lifetime` says otherwise.
pub(crate) const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(7 * 86400);

/// What a join token must say besides its signature, from the relay's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRules {
    /// The `aud` every token must carry: names this fleet.
    pub audience: String,
    /// The `iss` every token must carry, when set.
    pub issuer: Option<String>,
    /// Longest `exp - iat` (or `exp - nbf`, or `exp - now`) accepted.
    pub max_lifetime: Duration,
}

impl JoinRules {
    /// The audience a relay expects when `join_audience` is not set: `jumpgate:` and its
    /// public host, which the relays of a fleet behind one name share.
    pub fn default_audience(public_host: &str) -> String {
        format!("jumpgate:{public_host}")
    }

    /// Checks the settings `join_audience`, `join_issuer` and `join_max_lifetime`.
    pub fn new(
        audience: Option<String>,
        issuer: Option<String>,
        max_lifetime: Duration,
        public_host: &str,
    ) -> Result<Self, ConfigError> {
        let audience = audience.unwrap_or_else(|| Self::default_audience(public_host));
        check_claim_text("join_audience", &audience)?;
        if let Some(issuer) = &issuer {
            check_claim_text("join_issuer", issuer)?;
        }
        if max_lifetime < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "join_max_lifetime",
                detail: format!("{max_lifetime:?} is shorter than a minute; e.g. 7d"),
            });
        }
        Ok(Self {
            audience,
            issuer,
            max_lifetime,
        })
    }
}

/// An audience or issuer: a short printable string without spaces.
fn check_claim_text(key: &'static str, text: &str) -> Result<(), ConfigError> {
    if text.is_empty() || text.len() > 200 || !text.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            key,
            detail: format!(
                "{text:?} must be 1-200 printable characters without spaces, e.g. \"jumpgate:jump.example.com\""
            ),
        });
    }
    Ok(())
}

/// The claims jumpgate reads (`aud` and `iss` are checked by the JWT library).
#[derive(Debug, Deserialize)]
struct Claims {
    /// The agent name, or `prefix-*`, the token may claim.
    sub: String,
    /// Unix seconds after which the token is refused (required: checked by the JWT library).
    #[serde(default)]
    exp: Option<u64>,
    /// Unix seconds it was minted.
    #[serde(default)]
    iat: Option<u64>,
    /// Unix seconds before which it is refused.
    #[serde(default)]
    nbf: Option<u64>,
}

/// The claims `mint-token` writes.
#[derive(Debug, Serialize)]
struct Minted<'a> {
    sub: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    exp: u64,
    iat: u64,
}

/// Which join key signed a token: SHA-256 of the key's PEM body, so a reload that finds another
/// key (not merely the same key rewritten) can end the sessions the old one let in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; 32]);

impl KeyId {
    fn of_pem(pem: &[u8]) -> Self {
        let body: Vec<u8> = String::from_utf8_lossy(pem)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .flat_map(|l| l.bytes().filter(|b| !b.is_ascii_whitespace()))
            .collect();
        Self(Sha256::digest(&body).into())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyId({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// A verified token's subject and the key that signed it: the credential of a session a signed
/// token let in. Shown as the subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedSubject {
    /// The `sub` claim: an agent name or `prefix-*`.
    pub subject: String,
    /// The key it was signed with.
    pub key: KeyId,
}

impl std::fmt::Display for SignedSubject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.subject)
    }
}

/// The public key join tokens must be signed with, and what else they must say.
pub(crate) struct JoinKey {
    key: DecodingKey,
    id: KeyId,
    rules: JoinRules,
}

impl std::fmt::Debug for JoinKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinKey")
            .field("key", &"Ed25519")
            .field("id", &self.id)
            .field("rules", &self.rules)
            .finish()
    }
}

/// Refuses a key file that group or others may write: it is a public key, so reading it is
/// harmless, but whoever can replace it can mint tokens for every name.
fn check_not_writable(path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::Invalid {
        key: "join_key_file",
        detail: format!("{}: {e}", path.display()),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(ConfigError::Invalid {
            key: "join_key_file",
            detail: format!(
                "{} is writable by group or others (mode {mode:o}): whoever can replace it can mint \
                 join tokens for any name; fix it with: chmod 644 {}",
                path.display(),
                path.display()
            ),
        });
    }
    Ok(())
}

impl JoinKey {
    /// Reads an Ed25519 public key (PEM, `BEGIN PUBLIC KEY`) from `path`, which group and
    /// others must not be able to write, to check tokens by `rules`.
    pub fn load(path: &Path, rules: JoinRules) -> Result<Self, ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            key: "join_key_file",
            detail: format!("{}: {detail}", path.display()),
        };
        check_not_writable(path)?;
        let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
        let key = DecodingKey::from_ed_pem(&pem).map_err(|e| {
            invalid(format!(
                "not an Ed25519 public key in PEM ({e}); make one with \
                 `openssl pkey -in join.key -pubout -out join.pub`"
            ))
        })?;
        Ok(Self {
            key,
            id: KeyId::of_pem(&pem),
            rules,
        })
    }

    /// Which key this is.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Whether `token` is shaped like a JWT (and so is checked here, not against the tokens).
    pub fn looks_signed(token: &Secret) -> bool {
        let t = token.expose();
        t.starts_with("eyJ") && t.matches('.').count() == 2
    }

    /// Checks `token` and that it may claim `name`; returns its subject, the session's identity.
    pub fn verify(&self, token: &Secret, name: &str) -> Result<SignedSubject, Refusal> {
        self.verify_at(token, name, now_secs())
    }

    fn verify_at(&self, token: &Secret, name: &str, now: u64) -> Result<SignedSubject, Refusal> {
        let rejected = |detail: String| Refusal::TokenRejected { detail };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[&self.rules.audience]);
        let mut required = vec!["exp", "sub", "aud"];
        if let Some(issuer) = &self.rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Claims>(token.expose(), &self.key, &validation)
            .map_err(|e| rejected(self.why_rejected(e.kind())))?
            .claims;
        let exp = claims
            .exp
            .ok_or_else(|| rejected("it has no \"exp\" claim".into()))?;
        let max = self.rules.max_lifetime.as_secs();
        let start = claims
            .iat
            .into_iter()
            .chain(claims.nbf)
            .max()
            .unwrap_or(now);
        if exp.saturating_sub(start) > max
            || exp.saturating_sub(now) > max.saturating_add(LEEWAY_SECS)
        {
            return Err(rejected(format!(
                "it lives longer than this relay's join_max_lifetime of {}; mint one with a shorter --ttl",
                humantime::format_duration(self.rules.max_lifetime)
            )));
        }
        let pattern = subject_pattern(&claims.sub).map_err(|e| {
            rejected(format!(
                "its subject is not an agent name or prefix-* pattern ({e})"
            ))
        })?;
        if !pattern.matches(name) {
            return Err(Refusal::NameNotAllowed { name: name.into() });
        }
        Ok(SignedSubject {
            subject: claims.sub,
            key: self.id,
        })
    }

    /// The reason an agent is given, in words an operator can act on.
    fn why_rejected(&self, kind: &ErrorKind) -> String {
        match kind {
            ErrorKind::ExpiredSignature => "it has expired; mint a new one".into(),
            ErrorKind::ImmatureSignature => {
                "it is not valid yet (its nbf is in the future; check the clocks)".into()
            }
            ErrorKind::InvalidSignature => "it is not signed by the key this relay trusts".into(),
            ErrorKind::InvalidAlgorithm => "it is not signed with EdDSA (Ed25519)".into(),
            ErrorKind::InvalidAudience => format!(
                "it is for another audience; this relay accepts aud {:?} (join_audience)",
                self.rules.audience
            ),
            ErrorKind::InvalidIssuer => "it is from another issuer (join_issuer)".into(),
            ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => format!(
                "it has no \"aud\" claim; this relay accepts aud {:?} (mint-token --audience)",
                self.rules.audience
            ),
            ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim:?} claim"),
            _ => "it is not a well-formed join token".into(),
        }
    }
}

/// A subject's name pattern: one agent name, or `prefix-*` with a non-empty prefix. `*` (every
/// name) is refused: a job's token must not be able to claim every other job's name.
fn subject_pattern(subject: &str) -> Result<NamePattern, String> {
    match NamePattern::parse(subject)? {
        NamePattern::Prefix(p) if p.is_empty() => Err(format!(
            "{subject:?} would claim every name; give one agent name or a prefix such as vh-exec-*"
        )),
        pattern => Ok(pattern),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a join token could not be minted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MintError {
    /// The name is not an agent name or pattern, or is `*`.
    #[error("--name {0}")]
    Name(String),
    /// The key file is unusable, or the audience or lifetime is wrong.
    #[error(transparent)]
    Key(#[from] ConfigError),
    /// The key file is readable by others.
    #[error(transparent)]
    Secret(#[from] jumpgate_config::SecretFileError),
}

/// Mints a join token for `name` (an agent name or `prefix-*`) valid for `ttl` (at most
/// `rules.max_lifetime`) for `rules`' audience and issuer, signed with the Ed25519 private key
/// (PEM, PKCS#8) at `key`.
pub(crate) fn mint(
    key: &Path,
    name: &str,
    ttl: Duration,
    rules: &JoinRules,
) -> Result<String, MintError> {
    subject_pattern(name).map_err(MintError::Name)?;
    if ttl.is_zero() || ttl > rules.max_lifetime {
        return Err(ConfigError::Invalid {
            key: "ttl",
            detail: format!(
                "{} must be between 1s and the relay's join_max_lifetime of {} (relays refuse longer-lived tokens)",
                humantime::format_duration(ttl),
                humantime::format_duration(rules.max_lifetime)
            ),
        }
        .into());
    }
    jumpgate_config::secret_file::check_private(key)?;
    let invalid = |detail: String| ConfigError::Invalid {
        key: "--key",
        detail: format!("{}: {detail}", key.display()),
    };
    let pem = std::fs::read(key).map_err(|e| invalid(e.to_string()))?;
    let signing = EncodingKey::from_ed_pem(&pem).map_err(|e| {
        invalid(format!(
            "not an Ed25519 private key in PEM ({e}); make one with \
             `openssl genpkey -algorithm ed25519 -out join.key`"
        ))
    })?;
    let now = now_secs();
    let claims = Minted {
        sub: name,
        aud: &rules.audience,
        iss: rules.issuer.as_deref(),
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &signing)
        .map_err(|e| invalid(format!("cannot sign with this key: {e}")).into())
}

#[cfg(test)]
mod tests;
