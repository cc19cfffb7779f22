//! The checks before a WebSocket upgrade, as one pure function of the request's query and
//! headers (so it is unit-tested and fuzzed without a socket): query size, Origin allowlist,
//! and who the user is (`?userId=` in auth mode none, a verified token in mode token).

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::auth;
use crate::config::{AuthMode, Config};
use crate::protocol::is_valid_user_id;

/// Longest query accepted on `/ws/chat`, in bytes (a token fits easily).
pub const MAX_QUERY_BYTES: usize = 4096;

/// Who is connecting, once admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    /// When the token expires (unix seconds); the session is closed then.
    pub expires_at: Option<i64>,
    /// `?since=SEQ`: replay the inbox after this seq before going live.
    pub since: Option<u64>,
}

/// A refusal before the upgrade: HTTP status and a JSON body with a stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        super::rest::json_error(self.status, self.code, &self.message)
    }
}

/// Decides whether a WebSocket request may be upgraded, and as whom; the REST endpoints that
/// act as a user (history) ask it the same.
pub fn admit(
    config: &Config,
    query: Option<&str>,
    headers: &HeaderMap,
    now_secs: i64,
) -> Result<Identity, Refusal> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return Err(Refusal::new(
            StatusCode::URI_TOO_LONG,
            "QUERY_TOO_LONG",
            format!(
                "the query is {} bytes; the limit is {MAX_QUERY_BYTES}",
                query.len()
            ),
        ));
    }
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
            format!("cannot read query: {e}"),
        )
    })?;
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };

    let allowed = &config.server.allowed_origins;
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !allowed.is_empty() && !allowed.iter().any(|a| a.as_bytes() == origin.as_bytes()) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "ORIGIN_NOT_ALLOWED",
                "this origin may not open a chat connection (server.allowed_origins)",
            ));
        }
    }

    let since = match param("since").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "INVALID_SINCE",
                format!(
                    "since {:?} is not a seq: give the last seq this device saw (0 for everything)",
                    s.chars().take(32).collect::<String>()
                ),
            )
        })?),
    };
    let claimed = param("userId").filter(|u| !u.is_empty());
    if let Some(id) = claimed {
        if !is_valid_user_id(id) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "INVALID_USER_ID",
                "userId must be 1-64 characters of A-Z a-z 0-9 _ . : @ -",
            ));
        }
    }
    match config.auth.mode {
        AuthMode::None => match claimed {
            Some(id) => Ok(Identity {
                user_id: id.to_string(),
                expires_at: None,
                since,
            }),
            None => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "INVALID_USER_ID",
                "missing userId: add ?userId=<id> (/ws/chat?userId=<id>)",
            )),
        },
        AuthMode::Token => {
            let token = token_of(headers, param("token")).ok_or(auth::TokenError::Missing);
            let claims = token
                .and_then(|t| auth::verify(config.auth.secret.as_bytes(), &t, now_secs))
                .map_err(|e| {
                    Refusal::new(StatusCode::UNAUTHORIZED, "INVALID_TOKEN", e.to_string())
                })?;
            if let Some(id) = claimed {
                if id != claims.sub {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "USER_MISMATCH",
                        "userId is not the token's user; leave userId out in token mode",
                    ));
                }
            }
            Ok(Identity {
                user_id: claims.sub,
                expires_at: Some(claims.exp),
                since,
            })
        }
    }
}

/// The token a request carries: `?token=` (a browser cannot set headers on a WebSocket), else
/// `Authorization: Bearer`. The chat socket and the operator's REST data read it the same way.
pub(crate) fn token_of(
    headers: &axum::http::HeaderMap,
    query_token: Option<&str>,
) -> Option<String> {
    let bearer = || {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
    };
    query_token.or_else(bearer).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn token_config() -> Config {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Token;
        c.auth.secret = SECRET.into();
        c
    }

    fn code(r: Result<Identity, Refusal>) -> &'static str {
        r.map(|_| "OK").unwrap_or_else(|e| e.code)
    }

    #[test]
    fn mode_none_takes_the_user_id() {
        let c = Config::default();
        let h = HeaderMap::new();
        assert_eq!(
            admit(&c, Some("userId=alice"), &h, 0).unwrap().user_id,
            "alice"
        );
        assert_eq!(code(admit(&c, None, &h, 0)), "INVALID_USER_ID");
        assert_eq!(
            code(admit(&c, Some("userId=a%20b"), &h, 0)),
            "INVALID_USER_ID"
        );
        assert_eq!(
            code(admit(
                &c,
                Some(&format!("userId={}", "x".repeat(5000))),
                &h,
                0
            )),
            "QUERY_TOO_LONG"
        );
    }

    #[test]
    fn mode_token_takes_the_user_from_the_token() {
        let c = token_config();
        let t = auth::sign(SECRET.as_bytes(), "alice", 0, 100);
        let h = HeaderMap::new();
        let id = admit(&c, Some(&format!("token={t}")), &h, 50).unwrap();
        assert_eq!((id.user_id.as_str(), id.expires_at), ("alice", Some(100)));
        assert_eq!(
            code(admit(&c, Some(&format!("token={t}")), &h, 100)),
            "INVALID_TOKEN"
        );
        assert_eq!(
            code(admit(&c, Some("userId=alice"), &h, 50)),
            "INVALID_TOKEN"
        );
        assert_eq!(
            code(admit(&c, Some(&format!("token={t}&userId=bob")), &h, 50)),
            "USER_MISMATCH"
        );
        let mut bearer = HeaderMap::new();
        bearer.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        assert_eq!(admit(&c, None, &bearer, 50).unwrap().user_id, "alice");
        let foreign = auth::sign(b"some other secret of enough length!!", "alice", 0, 100);
        assert_eq!(
            code(admit(&c, Some(&format!("token={foreign}")), &h, 50)),
            "INVALID_TOKEN"
        );
    }

    #[test]
    fn origins() {
        let mut c = Config::default();
        c.server.allowed_origins = vec!["https://app.example".into()];
        let mut h = HeaderMap::new();
        assert_eq!(
            code(admit(&c, Some("userId=a"), &h, 0)),
            "OK",
            "no Origin: a native client"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://app.example"),
        );
        assert_eq!(code(admit(&c, Some("userId=a"), &h, 0)), "OK");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            code(admit(&c, Some("userId=a"), &h, 0)),
            "ORIGIN_NOT_ALLOWED"
        );
    }
}
