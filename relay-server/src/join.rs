//! Signed join tokens: per-job credentials a platform mints without touching the relay.
//!
//! A join token is a JWT signed with Ed25519 (`alg: EdDSA`) by a key the platform keeps; the
//! relay holds only the public key (`join_key_file`). Its `sub` claim names the agent name it may
//! claim, exactly or as a `prefix-*` pattern, and `exp` when it stops being accepted. It is
//! checked whenever an agent connects or reconnects; a session in progress is not cut when its
//! token expires. The subject is the session's identity: a token for one job cannot take over
//! another job's name, even where both tokens would be valid. Any JWT library can mint one;
//! operators can use `relay-server mint-token`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use jumpgate_config::ConfigError;
use jumpgate_proto::{Refusal, Secret};
use serde::{Deserialize, Serialize};

use crate::policy::NamePattern;

/// Clock difference tolerated between the platform that mints and the relay that checks.
const LEEWAY_SECS: u64 = 60;

/// The claims jumpgate reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The agent name, or `prefix-*`, the token may claim.
    sub: String,
    /// Unix seconds after which the token is refused.
    exp: u64,
    /// Unix seconds it was minted.
    #[serde(default)]
    iat: u64,
}

/// The public key join tokens must be signed with.
pub(crate) struct JoinKey(DecodingKey);

impl std::fmt::Debug for JoinKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinKey(Ed25519)")
    }
}

impl JoinKey {
    /// Reads an Ed25519 public key (PEM, `BEGIN PUBLIC KEY`) from `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            key: "join_key_file",
            detail: format!("{}: {detail}", path.display()),
        };
        let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
        DecodingKey::from_ed_pem(&pem).map(Self).map_err(|e| {
            invalid(format!(
                "not an Ed25519 public key in PEM ({e}); make one with \
                 `openssl pkey -in join.key -pubout -out join.pub`"
            ))
        })
    }

    /// Whether `token` is shaped like a JWT (and so is checked here, not against the tokens).
    pub fn looks_signed(token: &Secret) -> bool {
        let t = token.expose();
        t.starts_with("eyJ") && t.matches('.').count() == 2
    }

    /// Checks `token` and that it may claim `name`; returns its subject, the session's identity.
    pub fn verify(&self, token: &Secret, name: &str) -> Result<String, Refusal> {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token.expose(), &self.0, &validation)
            .map_err(|e| Refusal::TokenRejected {
                detail: why_rejected(e.kind()),
            })?
            .claims;
        let pattern = NamePattern::parse(&claims.sub).map_err(|e| Refusal::TokenRejected {
            detail: format!("its subject is not an agent name or prefix-* pattern ({e})"),
        })?;
        if !pattern.matches(name) {
            return Err(Refusal::NameNotAllowed { name: name.into() });
        }
        Ok(claims.sub)
    }
}

/// The reason an agent is given, in words an operator can act on.
fn why_rejected(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "it has expired; mint a new one".into(),
        ErrorKind::ImmatureSignature => "it is not valid yet (check the clocks)".into(),
        ErrorKind::InvalidSignature => "it is not signed by the key this relay trusts".into(),
        ErrorKind::InvalidAlgorithm => "it is not signed with EdDSA (Ed25519)".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim:?} claim"),
        _ => "it is not a well-formed join token".into(),
    }
}

/// Why a join token could not be minted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MintError {
    /// The name is not an agent name or pattern.
    #[error("--name {0}")]
    Name(String),
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] ConfigError),
    /// The key file is readable by others.
    #[error(transparent)]
    Secret(#[from] jumpgate_config::SecretFileError),
}

/// Mints a join token for `name` (an agent name or `prefix-*`) valid for `ttl`, signed with the
/// Ed25519 private key (PEM, PKCS#8) at `key`.
pub(crate) fn mint(key: &Path, name: &str, ttl: Duration) -> Result<String, MintError> {
    NamePattern::parse(name).map_err(MintError::Name)?;
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
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: name.into(),
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &signing)
        .map_err(|e| invalid(format!("cannot sign with this key: {e}")).into())
}
