//! The WebSocket endpoint: the checks before the upgrade, then one session per connection,
//! split into a reader (this task: frames in, the message path) and a writer (a task draining
//! the connection's bounded outbox).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite;

use super::rest::json_error;
use super::AppState;
use crate::chat::metrics::Metrics;
use crate::chat::registry::{CloseReason, SessionHandle};
use crate::chat::Node;
use crate::protocol::{
    is_valid_user_id, parse_client_frame, ClientFrame, ParseContext, ServerFrame,
};

/// Longest a single write to a socket may take before the connection counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to try to send a close frame; a peer that does not read will not get it anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Frames written before one flush when several are queued.
const WRITE_BATCH: usize = 64;

/// `GET /ws/chat?userId=U`: refuses a bad user id with 400 and a JSON body before upgrading.
pub async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let params = match query {
        Ok(Query(params)) => params,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "INVALID_QUERY",
                &format!("cannot read query: {e}"),
            )
        }
    };
    let user_id = match params
        .iter()
        .find(|(k, _)| k == "userId")
        .map(|(_, v)| v.as_str())
    {
        None | Some("") => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "INVALID_USER_ID",
                "missing userId: connect to /ws/chat?userId=<id>",
            )
        }
        Some(id) if !is_valid_user_id(id) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "INVALID_USER_ID",
                "userId must be 1-64 characters of A-Z a-z 0-9 _ . : @ -",
            )
        }
        Some(id) => id.to_string(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return json_error(
                e.status(),
                "NOT_A_WEBSOCKET",
                &format!("{e}: connect with a WebSocket client"),
            )
        }
    };
    if state.node.is_shutting_down() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            "this node is shutting down; connect to another node",
        );
    }
    let max = state.node.config.server.max_frame_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::warn!("WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket: WebSocket| async move {
            let _guard = state.tracker.enter();
            let (sink, stream) = socket.split();
            run_session(state.node, user_id, sink, stream).await;
        })
        .into_response()
}

/// One session from `CONNECTED` to close. Generic over the socket halves so that it does not
/// depend on how the socket was made.
pub async fn run_session<Si, St>(node: Arc<Node>, user_id: String, sink: Si, mut stream: St)
where
    Si: Sink<Message, Error = axum::Error> + Send + Unpin + 'static,
    St: Stream<Item = Result<Message, axum::Error>> + Send + Unpin,
{
    Metrics::inc(&node.metrics.connections_total);
    let server = &node.config.server;
    let connection_id = format!("c{}", node.ids.next().0);
    let (handle, ends) = SessionHandle::new(&user_id, &connection_id, server.send_queue_len);

    // Queued before the session is visible, so `CONNECTED` is always the first frame.
    node.reply(
        &handle,
        &ServerFrame::Connected {
            user_id: &user_id,
            node_id: &node.node_id,
            connection_id: &connection_id,
            heartbeat_interval_ms: server.heartbeat_interval_ms,
        },
    )
    .await;
    node.sessions.add(handle.clone());
    node.register(&handle).await;
    tracing::info!(user = %user_id, connection = %connection_id, "connected");

    let writer = tokio::spawn(write_loop(sink, ends.outbox, ends.close.clone()));
    let mut close = ends.close;
    let mut shutdown = node.shutdown_signal();
    if *shutdown.borrow_and_update() {
        handle.request_close(1001, "server shutting down");
    }
    let idle = Duration::from_millis(server.idle_timeout_ms);
    let ctx = ParseContext {
        user_id: &user_id,
        max_content_chars: server.max_content_chars,
    };

    let ended = loop {
        tokio::select! {
            _ = close.changed() => break "closed by the server",
            _ = shutdown.changed() => {
                handle.request_close(1001, "server shutting down");
                break "server shutting down";
            }
            next = tokio::time::timeout(idle, stream.next()) => match next {
                Err(_) => {
                    handle.request_close(1000, &format!("idle timeout: nothing received for {} ms", idle.as_millis()));
                    break "idle timeout";
                }
                Ok(None) => break "peer went away",
                Ok(Some(Err(e))) => {
                    let (code, reason) = close_for_error(e, server.max_frame_bytes);
                    handle.request_close(code, &reason);
                    break "protocol error";
                }
                Ok(Some(Ok(Message::Text(text)))) => handle_text(&node, &handle, &text, ctx).await,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    handle.request_close(1003, "binary frames are not supported: send JSON text frames");
                    break "binary frame";
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(Message::Close(_)))) => break "closed by the client",
            }
        }
    };

    node.sessions.remove(&handle);
    if let Err(e) = node
        .backends
        .presence
        .disconnect(&user_id, &connection_id)
        .await
    {
        Metrics::inc(&node.metrics.presence_failures);
        tracing::warn!(user = %user_id, "presence not cleared: {e}");
    }
    drop(handle);
    // The writer drains what is queued (or sends the close frame) and stops; not forever.
    let abort = writer.abort_handle();
    if tokio::time::timeout(WRITE_TIMEOUT, writer).await.is_err() {
        abort.abort();
    }
    tracing::info!(user = %user_id, connection = %connection_id, reason = ended, "disconnected");
}

async fn handle_text(node: &Node, handle: &SessionHandle, text: &str, ctx: ParseContext<'_>) {
    match parse_client_frame(text, ctx) {
        Err(e) => node.reply_error(handle, &e).await,
        Ok(ClientFrame::Chat(send)) => node.handle_chat(handle, send).await,
        Ok(ClientFrame::Heartbeat) => {
            node.heartbeat(handle).await;
            node.reply(handle, &ServerFrame::HeartbeatAck { content: "pong" })
                .await;
        }
        Ok(ClientFrame::ReadReceipt {
            chat_id,
            message_id,
            ..
        }) => {
            node.handle_read_receipt(handle, &chat_id, &message_id)
                .await
        }
        Ok(ClientFrame::Typing {
            receiver_id,
            chat_id,
            typing,
        }) => {
            node.handle_typing(handle, &receiver_id, &chat_id, typing)
                .await
        }
    }
}

/// The close code for a socket error: 1009 for an oversized message (refused by the
/// WebSocket layer from the frame header, before the payload is buffered), 1007 for invalid
/// UTF-8, 1002 for other protocol violations.
fn close_for_error(e: axum::Error, max_frame_bytes: usize) -> (u16, String) {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => (
            1009,
            format!("message too big: the limit is {max_frame_bytes} bytes"),
        ),
        Some(tungstenite::Error::Utf8(_)) => (1007, "text frame is not valid UTF-8".into()),
        Some(tungstenite::Error::Protocol(p)) => (1002, format!("protocol error: {p}")),
        _ => (1011, format!("connection error: {inner}")),
    }
}

async fn write_loop<Si>(
    mut sink: Si,
    mut outbox: mpsc::Receiver<Utf8Bytes>,
    mut close: watch::Receiver<Option<CloseReason>>,
) where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    loop {
        // A close request wins over queued frames, also while a write is stuck on a reader
        // that does not read.
        let written = tokio::select! {
            biased;
            _ = close.changed() => false,
            frame = outbox.recv() => match frame {
                None => return,
                Some(frame) => tokio::select! {
                    biased;
                    _ = close.changed() => false,
                    r = tokio::time::timeout(WRITE_TIMEOUT, write_batch(&mut sink, frame, &mut outbox)) => {
                        if !matches!(r, Ok(Ok(()))) {
                            return;
                        }
                        true
                    }
                },
            },
        };
        if !written {
            break;
        }
    }
    let reason = close.borrow().clone();
    if let Some(CloseReason { code, reason }) = reason {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
    }
}

/// Writes `first` and whatever else is already queued (up to a batch), then flushes once.
async fn write_batch<Si>(
    sink: &mut Si,
    first: Utf8Bytes,
    outbox: &mut mpsc::Receiver<Utf8Bytes>,
) -> Result<(), axum::Error>
where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    sink.feed(Message::Text(first)).await?;
    for _ in 1..WRITE_BATCH {
        match outbox.try_recv() {
            Ok(frame) => sink.feed(Message::Text(frame)).await?,
            Err(_) => break,
        }
    }
    sink.flush().await
}
