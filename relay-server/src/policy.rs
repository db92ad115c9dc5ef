//! Who may connect, and as whom: the part of the configuration a reload (SIGHUP) swaps live.
//!
//! Agents prove themselves with the shared token, a per-agent token from the tokens file (which
//! also limits the names it may claim, exactly or by `prefix-*`), or a client certificate whose
//! DNS name is the only name it may claim. Users are filtered by the relay's CIDR allowlist and
//! the agent's own, narrower one.

use std::path::Path;

use jumpgate_config::{load_toml, secret_file::check_private, ConfigError};
use jumpgate_proto::{Cidr, Refusal, Secret};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::claims::CredentialCaps;
use crate::claims::NamePattern;
use crate::config::RelayConfig;
use crate::error::RelayError;
use crate::join::{JoinKey, SignedSubject};

/// SHA-256 of a token: identifies which credential a session used without keeping the token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &Secret) -> Self {
        Self(Sha256::digest(token.expose().as_bytes()).into())
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(..)")
    }
}

/// How a session authenticated; kept with the session so a reload can revoke it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The relay-wide token.
    SharedToken(TokenDigest),
    /// A per-agent token, by its label in the tokens file.
    Token {
        /// The entry's label (never the token).
        label: String,
        /// Which token it was.
        digest: TokenDigest,
    },
    /// A client certificate for this DNS name.
    Certificate(String),
    /// A signed join token with this subject (a name or `prefix-*`), and the key that signed it.
    Signed(SignedSubject),
}

impl Credential {
    /// Who this is, for deciding whether a claim on a name is the holder's own: the token
    /// entry's label (so rotating an entry's token keeps its names), the certificate's name, or
    /// the shared token, which is one identity for every agent that has it.
    pub fn identity(&self) -> String {
        match self {
            Credential::SharedToken(_) => "shared-token".into(),
            Credential::Token { label, .. } => format!("token:{label}"),
            Credential::Certificate(name) => format!("cert:{name}"),
            Credential::Signed(subject) => format!("signed:{subject}"),
        }
    }
}

impl std::fmt::Display for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::SharedToken(_) => f.write_str("shared token"),
            Credential::Token { label, .. } => write!(f, "token {label:?}"),
            Credential::Certificate(name) => write!(f, "certificate for {name}"),
            Credential::Signed(subject) => write!(f, "signed token for {subject}"),
        }
    }
}

#[derive(Debug)]
struct TokenGrant {
    label: String,
    token: Secret,
    digest: TokenDigest,
    agents: Vec<NamePattern>,
    caps: Option<CredentialCaps>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    label: String,
    token: Secret,
    agents: Vec<String>,
    /// This entry's own caps, instead of `max_names_per_credential` /
    /// `max_leases_per_credential` / `max_sessions_per_credential`.
    max_names: Option<usize>,
    max_leases: Option<usize>,
    max_sessions: Option<usize>,
}

/// The live access policy.
#[derive(Debug)]
pub struct Policy {
    shared_token: Option<(Secret, TokenDigest)>,
    tokens: Vec<TokenGrant>,
    client_ca: bool,
    join_key: Option<JoinKey>,
    /// Caps for credentials without their own.
    default_caps: CredentialCaps,
    /// What every user connection must pass.
    pub users: UserLimits,
    /// Addresses never banned for failed agent handshakes (the operator's list).
    pub ban_exempt: Vec<Cidr>,
}

/// The part of the policy the public side reads for every user connection.
#[derive(Debug, Clone)]
pub struct UserLimits {
    /// Who may connect to allocated ports.
    pub allow: Vec<Cidr>,
    /// Concurrent user connections per port.
    pub max_conns_per_port: usize,
    /// New user connections per second per port.
    pub max_new_conns_per_sec: u32,
    /// Concurrent user connections per source address (IPv6: /64) per port.
    pub max_conns_per_source: usize,
}

/// Minimum token length: anything shorter is guessable.
const MIN_TOKEN_LEN: usize = 16;

fn load_tokens(path: &Path, defaults: CredentialCaps) -> Result<Vec<TokenGrant>, RelayError> {
    check_private(path)?;
    let file: TokensFile = load_toml(path)?;
    let invalid = |detail: String| {
        RelayError::Config(ConfigError::Invalid {
            key: "tokens_file",
            detail: format!("{}: {detail}", path.display()),
        })
    };
    let mut grants = Vec::with_capacity(file.token.len());
    for entry in file.token {
        if entry.label.trim().is_empty() {
            return Err(invalid("every [[token]] needs a non-empty label".into()));
        }
        if entry.token.expose().len() < MIN_TOKEN_LEN {
            return Err(invalid(format!(
                "token {:?} is shorter than {MIN_TOKEN_LEN} characters; generate one with `openssl rand -hex 32`",
                entry.label
            )));
        }
        if entry.agents.is_empty() {
            return Err(invalid(format!(
                "token {:?} lists no agents; give names or patterns such as \"vh-exec-*\"",
                entry.label
            )));
        }
        let agents = entry
            .agents
            .iter()
            .map(|a| NamePattern::parse(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        if grants.iter().any(|g: &TokenGrant| g.token == entry.token) {
            return Err(invalid(format!(
                "token {:?} duplicates another entry's token",
                entry.label
            )));
        }
        if [entry.max_names, entry.max_leases, entry.max_sessions].contains(&Some(0)) {
            return Err(invalid(format!(
                "token {:?}: max_names, max_leases and max_sessions must be at least 1 (remove the entry to revoke it)",
                entry.label
            )));
        }
        let own =
            entry.max_names.is_some() || entry.max_leases.is_some() || entry.max_sessions.is_some();
        let caps = own.then(|| CredentialCaps {
            names: entry.max_names.unwrap_or(defaults.names),
            leases: entry.max_leases.unwrap_or(defaults.leases),
            sessions: entry.max_sessions.unwrap_or(defaults.sessions),
        });
        grants.push(TokenGrant {
            caps,
            digest: TokenDigest::of(&entry.token),
            label: entry.label,
            token: entry.token,
            agents,
        });
    }
    Ok(grants)
}

/// What a credential may hold unless its tokens-file entry says otherwise.
fn default_caps(config: &RelayConfig) -> CredentialCaps {
    CredentialCaps {
        names: config.max_names_per_credential,
        leases: config.max_leases_per_credential,
        sessions: config.max_sessions_per_credential,
    }
}

fn ct_eq(a: &Secret, b: &Secret) -> bool {
    bool::from(a.expose().as_bytes().ct_eq(b.expose().as_bytes()))
}

impl Policy {
    /// Reads and checks the credential files the operator wrote (tokens file, join key) and
    /// nothing else: `check-config` runs it, so a bad file or mode is found before a start is,
    /// without generating a token in the state dir as [`Policy::load`] may.
    pub fn check_files(config: &RelayConfig) -> Result<(), RelayError> {
        Self::load_files(config).map(drop)
    }

    fn load_files(config: &RelayConfig) -> Result<(Vec<TokenGrant>, Option<JoinKey>), RelayError> {
        let tokens = match &config.tokens_file {
            Some(path) => load_tokens(path, default_caps(config))?,
            None => Vec::new(),
        };
        let join_key = match &config.join_key_file {
            Some(path) => Some(JoinKey::load(path, config.join.clone())?),
            None => None,
        };
        Ok((tokens, join_key))
    }

    /// Builds the policy from a validated configuration, reading its token files.
    ///
    /// The shared token applies when one is configured (`token_file` or `JUMPGATE_TOKEN`), or when
    /// neither a tokens file nor a client CA is, in which case one is generated in the state dir.
    pub fn load(config: &RelayConfig) -> Result<Self, RelayError> {
        let default_caps = default_caps(config);
        let (tokens, join_key) = Self::load_files(config)?;
        let explicit_shared = config.token_file.is_some() || config.env_token.is_some();
        let per_agent =
            config.tokens_file.is_some() || config.client_ca.is_some() || join_key.is_some();
        let shared_token = if explicit_shared || !per_agent {
            let token = crate::identity::load_token(config)?;
            let digest = TokenDigest::of(&token);
            Some((token, digest))
        } else {
            None
        };
        if shared_token.is_some() && per_agent {
            tracing::warn!(
                "a shared token is configured beside per-agent credentials: every holder of the \
                 shared token is one identity and may claim any name no other identity holds; \
                 give every agent its own credential and remove the shared token"
            );
        }
        Ok(Self {
            shared_token,
            tokens,
            client_ca: config.client_ca.is_some(),
            join_key,
            default_caps,
            users: UserLimits {
                allow: config.allow_cidr.clone(),
                max_conns_per_port: config.max_conns_per_port,
                max_new_conns_per_sec: config.max_new_conns_per_sec,
                max_conns_per_source: config.max_conns_per_source,
            },
            ban_exempt: config.ban_exempt_cidr.clone(),
        })
    }

    /// Decides whether an agent presenting `token` (and, under mutual TLS, a certificate for
    /// `cert_names`) may connect as `name`.
    pub fn authorize(
        &self,
        token: Option<&Secret>,
        cert_names: &[String],
        name: &str,
    ) -> Result<Credential, Refusal> {
        if !cert_names.is_empty() {
            return if cert_names.iter().any(|n| n == name) {
                Ok(Credential::Certificate(name.to_string()))
            } else {
                Err(Refusal::NameNotAllowed {
                    name: name.to_string(),
                })
            };
        }
        let token = token.ok_or(Refusal::Unauthorized)?;
        if let Some(key) = self
            .join_key
            .as_ref()
            .filter(|_| JoinKey::looks_signed(token))
        {
            return key.verify(token, name).map(Credential::Signed);
        }
        if let Some((shared, digest)) = &self.shared_token {
            if ct_eq(token, shared) {
                return Ok(Credential::SharedToken(*digest));
            }
        }
        // Compare against every entry, so timing does not reveal which one matched.
        let matched = self.tokens.iter().fold(None, |found, g| {
            if ct_eq(token, &g.token) {
                Some(g)
            } else {
                found
            }
        });
        match matched {
            Some(g) if g.agents.iter().any(|p| p.matches(name)) => Ok(Credential::Token {
                label: g.label.clone(),
                digest: g.digest,
            }),
            Some(_) => Err(Refusal::NameNotAllowed {
                name: name.to_string(),
            }),
            None => Err(Refusal::Unauthorized),
        }
    }

    /// How much `credential` may hold, or `None` for the shared token: it is every agent's
    /// credential where it is used, so capping it would cap the relay.
    pub fn caps(&self, credential: &Credential) -> Option<CredentialCaps> {
        match credential {
            Credential::SharedToken(_) => None,
            Credential::Token { digest, .. } => Some(
                self.tokens
                    .iter()
                    .find(|g| g.digest == *digest)
                    .and_then(|g| g.caps)
                    .unwrap_or(self.default_caps),
            ),
            Credential::Certificate(_) | Credential::Signed(_) => Some(self.default_caps),
        }
    }

    /// Whether a session that authenticated with `credential` as `name` is still allowed after a
    /// reload: its token still exists and still covers the name; a signed token's key is still
    /// the join key (rotating the key ends the sessions the old one let in).
    pub fn still_allows(&self, credential: &Credential, name: &str) -> bool {
        match credential {
            Credential::SharedToken(digest) => {
                self.shared_token.as_ref().is_some_and(|(_, d)| d == digest)
            }
            Credential::Token { digest, .. } => self
                .tokens
                .iter()
                .any(|g| g.digest == *digest && g.agents.iter().any(|p| p.matches(name))),
            Credential::Certificate(_) => self.client_ca,
            Credential::Signed(signed) => self
                .join_key
                .as_ref()
                .is_some_and(|key| key.id() == signed.key),
        }
    }
}

/// The policy in force, swapped whole on reload: readers take the current `Arc` and keep a
/// consistent view for as long as they hold it.
pub(crate) struct PolicyCell(std::sync::RwLock<std::sync::Arc<Policy>>);

impl PolicyCell {
    /// A cell holding `policy`.
    pub fn new(policy: Policy) -> Self {
        Self(std::sync::RwLock::new(std::sync::Arc::new(policy)))
    }

    /// The policy in force now.
    pub fn current(&self) -> std::sync::Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `policy` in force for everything that reads it from now on.
    pub fn replace(&self, policy: std::sync::Arc<Policy>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = policy;
    }
}

#[cfg(test)]
impl Policy {
    /// No credentials, these user limits: for in-process tests of the public side.
    pub(crate) fn with_user_limits(users: UserLimits) -> Self {
        Self {
            shared_token: None,
            tokens: Vec::new(),
            client_ca: false,
            join_key: None,
            default_caps: CredentialCaps {
                names: 1,
                leases: 1,
                sessions: 1,
            },
            users,
            ban_exempt: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tokens: Vec<(&str, &str, Vec<&str>)>) -> Policy {
        Policy {
            shared_token: None,
            tokens: tokens
                .into_iter()
                .map(|(label, token, agents)| TokenGrant {
                    label: label.into(),
                    token: Secret::new(token),
                    digest: TokenDigest::of(&Secret::new(token)),
                    agents: agents
                        .iter()
                        .map(|a| NamePattern::parse(a).unwrap())
                        .collect(),
                    caps: None,
                })
                .collect(),
            client_ca: true,
            join_key: None,
            default_caps: CredentialCaps {
                names: 1,
                leases: 1,
                sessions: 1,
            },
            users: UserLimits {
                allow: vec![],
                max_conns_per_port: 1,
                max_new_conns_per_sec: 1,
                max_conns_per_source: 1,
            },
            ban_exempt: Vec::new(),
        }
    }

    #[test]
    fn tokens_claim_only_their_names() {
        let p = policy(vec![
            ("team-a", "aaaaaaaaaaaaaaaaaaaa", vec!["team-a-*"]),
            ("one", "bbbbbbbbbbbbbbbbbbbb", vec!["vh-exec-1"]),
        ]);
        let a = Secret::new("aaaaaaaaaaaaaaaaaaaa");
        assert!(matches!(
            p.authorize(Some(&a), &[], "team-a-7"),
            Ok(Credential::Token { .. })
        ));
        assert_eq!(
            p.authorize(Some(&a), &[], "team-b-7"),
            Err(Refusal::NameNotAllowed {
                name: "team-b-7".into()
            })
        );
        let b = Secret::new("bbbbbbbbbbbbbbbbbbbb");
        assert!(p.authorize(Some(&b), &[], "vh-exec-1").is_ok());
        assert!(p.authorize(Some(&b), &[], "vh-exec-10").is_err());
        assert_eq!(
            p.authorize(Some(&Secret::new("nope")), &[], "x"),
            Err(Refusal::Unauthorized)
        );
        assert_eq!(p.authorize(None, &[], "x"), Err(Refusal::Unauthorized));
    }

    #[test]
    fn certificates_claim_exactly_their_name() {
        let p = policy(vec![]);
        let names = vec!["worker-9".to_string()];
        assert!(p.authorize(None, &names, "worker-9").is_ok());
        assert!(p
            .authorize(Some(&Secret::new("x")), &names, "worker-8")
            .is_err());
    }

    #[test]
    fn revocation_is_seen_after_reload() {
        let before = policy(vec![("t", "cccccccccccccccccccc", vec!["w-*"])]);
        let cred = before
            .authorize(Some(&Secret::new("cccccccccccccccccccc")), &[], "w-1")
            .unwrap();
        assert!(before.still_allows(&cred, "w-1"));
        let after = policy(vec![("t", "dddddddddddddddddddd", vec!["w-*"])]);
        assert!(!after.still_allows(&cred, "w-1"));
        let narrowed = policy(vec![("t", "cccccccccccccccccccc", vec!["x-*"])]);
        assert!(!narrowed.still_allows(&cred, "w-1"));
    }

    #[test]
    fn patterns() {
        assert!(NamePattern::parse("vh-exec-*")
            .unwrap()
            .matches("vh-exec-12"));
        assert!(!NamePattern::parse("vh-exec-*").unwrap().matches("vh-other"));
        assert!(NamePattern::parse("bad name").is_err());
    }
}
