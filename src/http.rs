//! A small HTTP/1.1 client for the operator commands and tests, on hyper's client (already
//! compiled for tonic): one request per connection (a GET, or a JSON body sent with another
//! method), the answer read up to [`MAX_BODY`] bytes and decoded as UTF-8. Whatever answers
//! on the port cannot make it panic or read forever.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Larger than any answer of chatd's REST API (a health or stats document is a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http:// or ws:// URL")]
    BadUrl(String),
    #[error("{url}: {source}")]
    Io { url: String, source: std::io::Error },
    #[error("{url}: not an HTTP answer ({source})")]
    Protocol { url: String, source: hyper::Error },
    #[error("{url}: the answer is not readable: {reason}")]
    Body { url: String, reason: String },
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
}

/// `http://host:port` (or `ws://host:port/...`) to `host:port`.
pub fn authority(url: &str) -> Result<String, HttpError> {
    let bad = || HttpError::BadUrl(url.to_string());
    let u = url::Url::parse(url).map_err(|_| bad())?;
    if !matches!(u.scheme(), "http" | "ws") {
        return Err(bad());
    }
    let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    Ok(match u.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// GETs `path` from the node at `base`; returns the status and the body.
pub async fn get(base: &str, path: &str, wait: Duration) -> Result<(u16, String), HttpError> {
    send(base, hyper::Method::GET, path, None, wait).await
}

/// Sends `method` to `path` of the node at `base`, with `json` as its body if any; returns
/// the status and the body of the answer.
pub async fn send(
    base: &str,
    method: hyper::Method,
    path: &str,
    json: Option<&str>,
    wait: Duration,
) -> Result<(u16, String), HttpError> {
    let host = authority(base)?;
    let url = format!("http://{host}{path}");
    tokio::time::timeout(wait, fetch(&host, method, path, json, &url))
        .await
        .map_err(|_| HttpError::Timeout(url.clone(), wait))?
}

async fn fetch(
    host: &str,
    method: hyper::Method,
    path: &str,
    json: Option<&str>,
    url: &str,
) -> Result<(u16, String), HttpError> {
    let protocol = |source| HttpError::Protocol {
        url: url.to_string(),
        source,
    };
    let stream = TcpStream::connect(host)
        .await
        .map_err(|source| HttpError::Io {
            url: url.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(protocol)?;
    // Drives the connection; it ends with the request (or with the timeout around us).
    let driver = tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host);
    if json.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let body = Full::new(Bytes::from(json.unwrap_or_default().to_owned()));
    let request = request.body(body).map_err(|e| HttpError::Body {
        url: url.to_string(),
        reason: format!("bad request path: {e}"),
    })?;
    let answer = async {
        let response = sender.send_request(request).await.map_err(protocol)?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| HttpError::Body {
                url: url.to_string(),
                reason: e.to_string(),
            })?
            .to_bytes();
        let body = String::from_utf8(body.to_vec()).map_err(|e| HttpError::Body {
            url: url.to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        Ok((status, body))
    }
    .await;
    driver.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Serves `raw` once to whoever connects, after reading the request.
    async fn answering(raw: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&raw).await;
            let _ = s.shutdown().await;
        });
        format!("http://{addr}")
    }

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn reads_plain_and_chunked_answers() {
        let plain = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()).await;
        assert_eq!(get(&plain, "/", WAIT).await.unwrap(), (200, "ok".into()));
        let chunked = answering(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                .to_vec(),
        )
        .await;
        assert_eq!(
            get(&chunked, "/", WAIT).await.unwrap(),
            (404, "abcde".into())
        );
    }

    #[tokio::test]
    async fn hostile_answers_are_errors_not_panics() {
        // A chunk that splits a multi-byte character, a huge body, and not HTTP at all.
        let mut split = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n".to_vec();
        split.extend_from_slice("é".as_bytes());
        split.extend_from_slice(b"\r\n0\r\n\r\n");
        let url = answering(split).await;
        assert!(matches!(
            get(&url, "/", WAIT).await,
            Err(HttpError::Body { .. })
        ));
        let huge = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 10
        );
        let mut huge = huge.into_bytes();
        huge.extend(std::iter::repeat_n(b'x', MAX_BODY + 10));
        let url = answering(huge).await;
        assert!(matches!(
            get(&url, "/", WAIT).await,
            Err(HttpError::Body { .. })
        ));
        let url = answering(b"SSH-2.0-OpenSSH\r\n".to_vec()).await;
        assert!(matches!(
            get(&url, "/", WAIT).await,
            Err(HttpError::Protocol { .. })
        ));
    }

    #[test]
    fn authorities() {
        assert_eq!(
            authority("ws://127.0.0.1:9430/ws/chat").unwrap(),
            "127.0.0.1:9430"
        );
        assert!(authority("ftp://x").is_err());
        assert!(authority("http://").is_err());
    }
}
