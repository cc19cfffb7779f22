//! The WebSocket client shared by `connect`, `send`, and the tests: connect as a user, send
//! frames, read frames (JSON values) or the close that ended the connection.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::rate::TokenBucket;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url} refused the connection: HTTP {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot connect to {url}: {source} (is `chatd serve` running there?)")]
    Connect {
        url: String,
        source: tungstenite::Error,
    },
    #[error("connection error: {0}")]
    Socket(#[from] tungstenite::Error),
    #[error("the server closed the connection ({code}: {reason})")]
    Closed { code: u16, reason: String },
    #[error("the connection ended")]
    Ended,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the server sent a frame that is not JSON: {0}")]
    NotJson(String),
    #[error("the first frame was not CONNECTED: {0}")]
    NoWelcome(Value),
}

/// What arrived: a frame, or the close frame that ended the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(Value),
    Closed { code: u16, reason: String },
}

/// The endpoint URL for `user_id` on a node given as `ws://host:port` (or already with a path).
pub fn chat_url(base: &str, user_id: &str) -> String {
    chat_url_with_token(base, user_id, None)
}

/// `url` asking for a replay of the inbox after `since` before live frames.
pub fn with_since(url: &str, since: u64) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.query_pairs_mut().append_pair("since", &since.to_string());
            u.into()
        }
        // Not a URL: connecting to it fails and says so.
        Err(_) => url.to_string(),
    }
}

/// The endpoint URL with a token (auth mode token) as well as the user id, each encoded as a
/// query value (by the `url` crate).
pub fn chat_url_with_token(base: &str, user_id: &str, token: Option<&str>) -> String {
    let Ok(mut u) = url::Url::parse(base.trim_end_matches('/')) else {
        // Not a URL: connecting to it fails and says so.
        return base.to_string();
    };
    if !u.path().ends_with("/ws/chat") {
        let path = format!("{}/ws/chat", u.path().trim_end_matches('/'));
        u.set_path(&path);
    }
    {
        let mut query = u.query_pairs_mut();
        query.append_pair("userId", user_id);
        if let Some(token) = token {
            query.append_pair("token", token);
        }
    }
    u.into()
}

/// The URL with the value of every `token` query parameter replaced, for messages and logs;
/// a URL that does not parse loses its whole query.
pub fn redact_token(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return match url.split_once('?') {
            Some((before, _)) => format!("{before}?<redacted>"),
            None => url.to_string(),
        };
    };
    if !u.query_pairs().any(|(k, _)| k == "token") {
        return url.to_string();
    }
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "token" {
                "<redacted>".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    u.query_pairs_mut().clear().extend_pairs(pairs);
    u.into()
}

/// A connected client. Its halves are public so a caller can read and write at once
/// (`tokio::select!` over `reader.next()` while writing with `writer`).
pub struct Client {
    pub writer: ClientWriter,
    pub reader: ClientReader,
    /// The `CONNECTED` frame: user, node, connection id, heartbeat interval.
    pub welcome: Value,
}

pub struct ClientWriter {
    sink: SplitSink<Socket, Message>,
    /// When set, text frames wait for a token first (see [`ClientWriter::pace_to`]).
    pace: Option<TokenBucket>,
}

pub struct ClientReader {
    stream: SplitStream<Socket>,
}

impl Client {
    /// Connects to a node (`ws://host:port`) as `user_id` and waits for `CONNECTED`.
    pub async fn connect(base: &str, user_id: &str, wait: Duration) -> Result<Client, ClientError> {
        Self::connect_url(&chat_url(base, user_id), wait).await
    }

    /// Connects with a token, for nodes in auth mode token.
    pub async fn connect_with_token(
        base: &str,
        user_id: &str,
        token: Option<&str>,
        wait: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_url(&chat_url_with_token(base, user_id, token), wait).await
    }

    /// Connects to a full endpoint URL and waits for `CONNECTED`. Errors show the URL with
    /// any token redacted.
    pub async fn connect_url(url: &str, wait: Duration) -> Result<Client, ClientError> {
        let shown = redact_token(url);
        // Nagle off, as browsers do: a small frame sent while an earlier one is unacknowledged
        // would otherwise wait for the server's delayed ACK (tens of ms).
        let connecting = tokio_tungstenite::connect_async_with_config(url, None, true);
        let socket = match tokio::time::timeout(wait, connecting).await {
            Err(_) => return Err(ClientError::Timeout(wait)),
            Ok(Ok((socket, _))) => socket,
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(ClientError::Refused {
                    url: shown,
                    status,
                    body,
                });
            }
            Ok(Err(source)) => return Err(ClientError::Connect { url: shown, source }),
        };
        let (sink, stream) = socket.split();
        let mut client = Client {
            writer: ClientWriter { sink, pace: None },
            reader: ClientReader { stream },
            welcome: Value::Null,
        };
        match client.reader.next(wait).await? {
            Incoming::Frame(f) if f["type"] == "CONNECTED" => client.welcome = f,
            Incoming::Frame(f) => return Err(ClientError::NoWelcome(f)),
            Incoming::Closed { code, reason } => return Err(ClientError::Closed { code, reason }),
        }
        Ok(client)
    }

    /// Paces text frames under the rate limit the node told in `CONNECTED` (see
    /// [`ClientWriter::pace_to`]): a refusal, and then a close (1008), costs more.
    pub fn pace_to_node_limit(&mut self) {
        self.writer.pace_to(
            self.welcome["rateLimitPerSec"].as_u64().unwrap_or(0),
            self.welcome["rateLimitBurst"].as_u64().unwrap_or(0),
        );
    }

    pub fn connection_id(&self) -> &str {
        self.welcome["connectionId"].as_str().unwrap_or("")
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(
            self.welcome["heartbeatIntervalMs"]
                .as_u64()
                .unwrap_or(30_000),
        )
    }

    pub async fn send_json(&mut self, frame: &Value) -> Result<(), ClientError> {
        self.writer.send_json(frame).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.writer.send_text(text).await
    }

    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        self.writer.send_raw(message).await
    }

    pub async fn next(&mut self, wait: Duration) -> Result<Incoming, ClientError> {
        self.reader.next(wait).await
    }

    pub async fn next_frame(&mut self, wait: Duration) -> Result<Value, ClientError> {
        self.reader.next_frame(wait).await
    }

    pub async fn wait_for(
        &mut self,
        frame_type: &str,
        wait: Duration,
        skipped: impl FnMut(Value),
    ) -> Result<Value, ClientError> {
        self.reader.wait_for(frame_type, wait, skipped).await
    }

    /// Closes politely (1000) and waits briefly for the server's answer.
    pub async fn close(mut self) {
        if self.writer.close().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = self.reader.stream.next().await {}
            })
            .await;
        }
    }
}

impl ClientWriter {
    pub async fn send_json(&mut self, frame: &Value) -> Result<(), ClientError> {
        self.send_text(&frame.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        if let Some(pace) = &mut self.pace {
            pace.take().await;
        }
        Ok(self.sink.send(Message::text(text)).await?)
    }

    /// Paces text frames under the node's rate limit (told in `CONNECTED`): 90% of its rate,
    /// half its burst, so that frames bunched on the way still fit. 0 leaves them unpaced.
    pub fn pace_to(&mut self, per_sec: u64, burst: u64) {
        if per_sec == 0 {
            return;
        }
        let burst = (burst as f64 / 2.0).max(1.0);
        self.pace = Some(TokenBucket::new(per_sec as f64 * 0.9, burst));
    }

    /// Sends any WebSocket message (tests use this for binary and oversized frames).
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        Ok(self.sink.send(message).await?)
    }

    /// Sends a close frame (1000).
    pub async fn close(&mut self) -> Result<(), ClientError> {
        let frame = CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        };
        Ok(self.sink.send(Message::Close(Some(frame))).await?)
    }
}

impl ClientReader {
    /// The next frame or close, skipping pings and pongs.
    pub async fn next(&mut self, wait: Duration) -> Result<Incoming, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Err(ClientError::Timeout(wait)),
                Ok(None) => return Err(ClientError::Ended),
                Ok(Some(msg)) => msg?,
            };
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .map(Incoming::Frame)
                        .map_err(|_| ClientError::NotJson(t.to_string()))
                }
                Message::Close(frame) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Ok(Incoming::Closed { code, reason });
                }
                Message::Binary(b) => {
                    return Err(ClientError::NotJson(
                        String::from_utf8_lossy(&b).into_owned(),
                    ))
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    /// The next frame; a close is an error.
    pub async fn next_frame(&mut self, wait: Duration) -> Result<Value, ClientError> {
        match self.next(wait).await? {
            Incoming::Frame(f) => Ok(f),
            Incoming::Closed { code, reason } => Err(ClientError::Closed { code, reason }),
        }
    }

    /// Reads until a frame of `frame_type` arrives, passing the ones before it to `skipped`.
    pub async fn wait_for(
        &mut self,
        frame_type: &str,
        wait: Duration,
        mut skipped: impl FnMut(Value),
    ) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next_frame(left).await.map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(wait),
                e => e,
            })?;
            if f["type"] == frame_type {
                return Ok(f);
            }
            skipped(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(chat_url("ws://h:1", "bob"), "ws://h:1/ws/chat?userId=bob");
        assert_eq!(
            chat_url("ws://h:1/", "a@b&c=d"),
            "ws://h:1/ws/chat?userId=a%40b%26c%3Dd"
        );
        assert_eq!(
            chat_url("ws://h:1/ws/chat", "a b"),
            "ws://h:1/ws/chat?userId=a+b"
        );
        assert_eq!(
            chat_url("ws://h:1/ws/chat?x=1", "u"),
            "ws://h:1/ws/chat?x=1&userId=u"
        );
        assert_eq!(
            with_since(&chat_url("ws://h:1/chatd/", "u"), 7),
            "ws://h:1/chatd/ws/chat?userId=u&since=7"
        );
    }

    #[test]
    fn tokens_are_redacted_by_query_key() {
        let url = chat_url_with_token("ws://h:1", "u", Some("secret.jwt"));
        assert_eq!(url, "ws://h:1/ws/chat?userId=u&token=secret.jwt");
        assert_eq!(
            redact_token(&url),
            "ws://h:1/ws/chat?userId=u&token=%3Credacted%3E"
        );
        // A parameter whose name only ends in "token" is not the token.
        let other = "ws://h:1/ws/chat?userId=u&mytoken=visible";
        assert_eq!(redact_token(other), other);
        assert_eq!(redact_token("not a url?token=s"), "not a url?<redacted>");
    }
}
