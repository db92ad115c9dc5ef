use super::*;

/// A throwaway Ed25519 pair for these tests only.
const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\n\
    MC4CAQAwBQYDK2VwBCIEIKMauyjOfXu2cqMcCCm/305OpJKY3va/CIZbi7WP6eOL\n\
    -----END PRIVATE KEY-----\n";
const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\n\
    MCowBQYDK2VwAyEAxtJiNJ/wW8Gjpb/U8FDpLmJKnpQE+SyvMcCo3DX875U=\n\
    -----END PUBLIC KEY-----\n";

fn rules() -> JoinRules {
    JoinRules::new(None, None, DEFAULT_MAX_LIFETIME, "jump.example.com").unwrap()
}

fn key(rules: JoinRules) -> JoinKey {
    JoinKey {
        key: DecodingKey::from_ed_pem(PUBLIC.as_bytes()).unwrap(),
        id: KeyId::of_pem(PUBLIC.as_bytes()),
        rules,
    }
}

fn sign(claims: serde_json::Value) -> Secret {
    let signing = EncodingKey::from_ed_pem(PRIVATE.as_bytes()).unwrap();
    Secret::new(jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &signing).unwrap())
}

fn detail(r: Result<SignedSubject, Refusal>) -> String {
    match r {
        Err(Refusal::TokenRejected { detail }) => detail,
        other => panic!("expected TokenRejected, got {other:?}"),
    }
}

#[test]
fn a_well_formed_token_for_this_fleet_is_accepted() {
    let now = now_secs();
    let k = key(rules());
    let t = sign(serde_json::json!({
        "sub": "vh-*", "aud": "jumpgate:jump.example.com", "iat": now, "exp": now + 3600
    }));
    let who = k.verify_at(&t, "vh-1", now).unwrap();
    assert_eq!(who.to_string(), "vh-*");
    assert_eq!(who.key, k.id());
    assert_eq!(
        k.verify_at(&t, "other-1", now),
        Err(Refusal::NameNotAllowed {
            name: "other-1".into()
        })
    );
}

#[test]
fn audience_issuer_time_and_subject_are_enforced() {
    let now = now_secs();
    let aud = "jumpgate:jump.example.com";
    let k = key(rules());
    let check = |claims: serde_json::Value| detail(k.verify_at(&sign(claims), "vh-1", now));
    let d = check(serde_json::json!({"sub": "vh-1", "aud": "jumpgate:elsewhere", "exp": now + 60}));
    assert!(d.contains("another audience"), "{d}");
    let d = check(serde_json::json!({"sub": "vh-1", "exp": now + 60}));
    assert!(d.contains("no \"aud\" claim"), "{d}");
    let d = check(serde_json::json!({"sub": "vh-1", "aud": aud}));
    assert!(d.contains("no \"exp\" claim"), "{d}");
    // 30 s expired: beyond the few seconds of leeway.
    let d = check(serde_json::json!({"sub": "vh-1", "aud": aud, "exp": now - 30}));
    assert!(d.contains("expired"), "{d}");
    let d =
        check(serde_json::json!({"sub": "vh-1", "aud": aud, "nbf": now + 60, "exp": now + 120}));
    assert!(d.contains("not valid yet"), "{d}");
    // Eight days from iat, or from now without iat/nbf; or a long life behind a future iat.
    let week = DEFAULT_MAX_LIFETIME.as_secs();
    for claims in [
        serde_json::json!({"sub": "vh-1", "aud": aud, "iat": now, "exp": now + week + 86400}),
        serde_json::json!({"sub": "vh-1", "aud": aud, "exp": now + week + 86400}),
        serde_json::json!({"sub": "vh-1", "aud": aud, "iat": now + week, "exp": now + week + 3600}),
        serde_json::json!({"sub": "vh-1", "aud": aud, "iat": now - 60, "exp": now + week}),
    ] {
        let d = check(claims);
        assert!(d.contains("join_max_lifetime"), "{d}");
    }
    for sub in ["*", ""] {
        let d = check(serde_json::json!({"sub": sub, "aud": aud, "exp": now + 60}));
        assert!(d.contains("subject"), "{sub:?}: {d}");
    }
    // Within the leeway and the lifetime: accepted.
    let ok = sign(
        serde_json::json!({"sub": "vh-1", "aud": aud, "iat": now, "nbf": now + 3, "exp": now + week}),
    );
    k.verify_at(&ok, "vh-1", now).unwrap();

    let k = key(JoinRules::new(
        None,
        Some("platform".into()),
        DEFAULT_MAX_LIFETIME,
        "jump.example.com",
    )
    .unwrap());
    let d = detail(k.verify_at(&ok, "vh-1", now));
    assert!(d.contains("no \"iss\" claim"), "{d}");
    let other = sign(serde_json::json!({"sub": "vh-1", "aud": aud, "iss": "ci", "exp": now + 60}));
    let d = detail(k.verify_at(&other, "vh-1", now));
    assert!(d.contains("another issuer"), "{d}");
}

#[test]
fn the_key_id_ignores_layout_but_not_the_key() {
    let rewrapped = PUBLIC.replace("\n-----END", "\n\n-----END");
    assert_eq!(
        KeyId::of_pem(PUBLIC.as_bytes()),
        KeyId::of_pem(rewrapped.as_bytes())
    );
    let other = PUBLIC.replace("xtJ", "xtK");
    assert_ne!(
        KeyId::of_pem(PUBLIC.as_bytes()),
        KeyId::of_pem(other.as_bytes())
    );
}

#[test]
fn settings_are_checked() {
    assert_eq!(rules().audience, "jumpgate:jump.example.com");
    assert!(JoinRules::new(Some("two words".into()), None, DEFAULT_MAX_LIFETIME, "h").is_err());
    assert!(JoinRules::new(Some(String::new()), None, DEFAULT_MAX_LIFETIME, "h").is_err());
    assert!(JoinRules::new(None, None, Duration::from_secs(1), "h").is_err());
}
