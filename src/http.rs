//! A minimal HTTP/1.1 GET for the operator commands and tests: one request per connection,
//! `Connection: close`, bodies read to the end (chunked or not). Enough for chatd's REST API;
//! not a general client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http:// or ws:// URL")]
    BadUrl(String),
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

/// `http://host:port` (or `ws://host:port/...`) to `host:port`.
pub fn authority(url: &str) -> Result<String, HttpError> {
    let rest = ["http://", "ws://"]
        .iter()
        .find_map(|p| url.strip_prefix(p))
        .ok_or_else(|| HttpError::BadUrl(url.to_string()))?;
    Ok(rest.split('/').next().unwrap_or(rest).to_string())
}

/// GETs `path` from the node at `base`; returns the status and the body.
pub async fn get(base: &str, path: &str, wait: Duration) -> Result<(u16, String), HttpError> {
    let host = authority(base)?;
    let url = format!("http://{host}{path}");
    let io = |source| HttpError::Io {
        url: url.clone(),
        source,
    };
    let work = async {
        let mut stream = TcpStream::connect(&host).await.map_err(io)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        Ok(parse_response(&raw))
    };
    tokio::time::timeout(wait, work)
        .await
        .map_err(|_| HttpError::Timeout(url.clone(), wait))?
}

/// Status and body of a raw response; status 0 when it is not HTTP.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain), (200, "ok".into()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), (404, "abcde".into()));
        assert_eq!(
            authority("ws://127.0.0.1:9430/ws/chat").unwrap(),
            "127.0.0.1:9430"
        );
        assert!(authority("ftp://x").is_err());
    }
}
