//! Any query string and Origin/Authorization header values at the handshake, in both auth
//! modes: the checks never panic, and whoever they admit has a valid user id.
#![no_main]

use chatd::config::{AuthMode, Config};
use chatd::protocol::is_valid_user_id;
use chatd::server::handshake::admit;
use http::{header, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.splitn(3, '\n');
    let query = parts.next().unwrap_or("");
    let origin = parts.next();
    let authorization = parts.next();

    let mut config = Config::default();
    config.server.allowed_origins = vec!["https://app.example".into()];
    if mode % 2 == 1 {
        config.auth.mode = AuthMode::Token;
        config.auth.secret = "fuzz-secret-0123456789abcdef0123456789".into();
    }
    let mut headers = HeaderMap::new();
    if let Some(v) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert(header::ORIGIN, v);
    }
    if let Some(v) = authorization.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(header::AUTHORIZATION, v);
    }
    if let Ok(identity) = admit(&config, Some(query), &headers, 1_700_000_000) {
        assert!(is_valid_user_id(&identity.user_id));
    }
});
