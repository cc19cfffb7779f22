//! Who may connect. `[auth] mode = "none"` trusts `?userId=` (local use); `mode = "token"`
//! takes the user from a signed token: a standard JWT, HS256 with `[auth] secret`, carried as
//! `?token=` or `Authorization: Bearer`. Its `sub` is the user, its `exp` is enforced at the
//! handshake and during the session. Only HS256 is accepted (never `none`), and the signature
//! is compared in constant time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::is_valid_user_id;

type HmacSha256 = Hmac<Sha256>;

/// The claims chatd reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: i64,
    /// Issued at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
}

/// Why a token was refused. The text is safe to return to the client: it never contains the
/// token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token: pass ?token=<jwt> or an Authorization: Bearer <jwt> header")]
    Missing,
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token algorithm {0:?} is not accepted; tokens are HS256")]
    Algorithm(String),
    #[error("token signature does not match (signed with another secret?)")]
    Signature,
    #[error("token expired; get a new one")]
    Expired,
    #[error("token subject is not a user id ([A-Za-z0-9_.:@-]{{1,64}})")]
    Subject,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// A token for `user` valid `ttl_secs` from `now` (unix seconds), signed with `secret`: what
/// `chatd token` prints, and what `crossnode-test` and the tests connect with.
pub fn mint(secret: &str, user: &str, ttl_secs: u64, now: i64) -> String {
    sign(
        secret.as_bytes(),
        user,
        now,
        now.saturating_add_unsigned(ttl_secs),
    )
}

/// A signed HS256 JWT for `sub`, valid until `exp` (unix seconds).
pub fn sign(secret: &[u8], sub: &str, iat: i64, exp: i64) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = Claims {
        sub: sub.to_string(),
        exp,
        iat: Some(iat),
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signing_input = format!("{header}.{payload}");
    let mut m = mac(secret);
    m.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

/// Checks a token's form, algorithm, signature, expiry and subject.
pub fn verify(secret: &[u8], token: &str, now_secs: i64) -> Result<Claims, TokenError> {
    if token.len() > 4096 {
        return Err(TokenError::Malformed("longer than 4096 characters"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let header: Header = URL_SAFE_NO_PAD
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("header is not base64url JSON"))?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm(header.alg.chars().take(16).collect()));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let mut m = mac(secret);
    m.update(h.as_bytes());
    m.update(b".");
    m.update(p.as_bytes());
    m.verify_slice(&signature)
        .map_err(|_| TokenError::Signature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed(
            "payload needs a string sub and a numeric exp",
        ))?;
    if now_secs >= claims.exp {
        return Err(TokenError::Expired);
    }
    if !is_valid_user_id(&claims.sub) {
        return Err(TokenError::Subject);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip() {
        let t = sign(SECRET, "alice", 100, 200);
        let c = verify(SECRET, &t, 150).unwrap();
        assert_eq!((c.sub.as_str(), c.exp), ("alice", 200));
    }

    #[test]
    fn refusals() {
        let t = sign(SECRET, "alice", 100, 200);
        assert_eq!(verify(SECRET, &t, 200), Err(TokenError::Expired));
        assert_eq!(
            verify(b"another secret entirely, 32 bytes", &t, 150),
            Err(TokenError::Signature)
        );
        assert!(matches!(
            verify(SECRET, "abc", 150),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verify(SECRET, "a.b.c.d", 150),
            Err(TokenError::Malformed(_))
        ));
        // A tampered payload keeps the old signature: refused.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"sub":"mallory","exp":999999}"#);
        assert_eq!(
            verify(SECRET, &format!("{}.{forged}.{}", parts[0], parts[2]), 150),
            Err(TokenError::Signature)
        );
        // alg "none" with no signature: refused before anything else.
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        assert_eq!(
            verify(SECRET, &format!("{none}.{}.", parts[1]), 150),
            Err(TokenError::Algorithm("none".into()))
        );
        let bad_sub = sign(SECRET, "not a user", 100, 200);
        assert_eq!(verify(SECRET, &bad_sub, 150), Err(TokenError::Subject));
    }

    #[test]
    fn interoperates_with_a_standard_jwt() {
        // Made by Python's hmac/hashlib, not by this module: {"sub":"bob","exp":4102444800}.
        let python = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDB9.022e1FjJvIwU9Vl8T-cNZhEWnUWy7Jn7N-NzZ3h0_C8";
        let c = verify(SECRET, python, 0).unwrap();
        assert_eq!((c.sub.as_str(), c.exp), ("bob", 4102444800));
    }
}
