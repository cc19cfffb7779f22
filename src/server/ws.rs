//! The WebSocket endpoint: the checks before the upgrade, then one session per connection,
//! split into a reader (this task: frames in, checked, chat messages handed to the node's
//! batched path without waiting for them) and a writer (a task draining the connection's
//! bounded outbox).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite;

use super::handshake::{self, Identity};
use super::rest::json_error;
use super::AppState;
use crate::chat::ids::now_ms;
use crate::chat::outbox;
use crate::chat::registry::{CloseReason, Closer, SessionHandle};
use crate::chat::{InFlight, Node};
use crate::protocol::{
    parse_client_frame, ClientFrame, ErrorCode, FrameError, ParseContext, ServerFrame,
};
use crate::rate::{FrameLimit, Verdict};

/// Longest a single write to a socket may take before the connection counts as dead.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to try to send a close frame; a peer that does not read will not get it anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After the server's close frame, how long it reads (and drops) what the client still
/// sends, waiting for the client's close frame.
const LINGER: Duration = Duration::from_secs(2);
/// Initial read buffer of a connection, and the write size that triggers a flush. The read
/// buffer grows for a larger frame; 512 B holds a typical chat frame. Against 4 KiB, 1 KiB
/// saved about 3 KiB per idle connection, and 512 B another 0.5 KiB (8.5 against 9.0 KiB,
/// `chatd bench --spawn --idle 9000`, same sitting) at the same CPU per message (4.8-5.0
/// against 4.9 µs, 6.05-6.22 against 6.20 µs with the store full).
const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 8 * 1024;
/// Frames written before one flush when several are queued.
const WRITE_BATCH: usize = 64;

/// `GET /ws/chat`: the handshake checks ([`handshake::admit`]), then the node's limits, all
/// before the upgrade, each refusal an HTTP status with a JSON body.
pub async fn upgrade(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let node = &state.node;
    let identity = match handshake::admit(&node.config, uri.query(), &headers, now_ms() / 1000) {
        Ok(identity) => identity,
        Err(refusal) => return refusal.into_response(),
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
    if node.is_shutting_down() {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SHUTTING_DOWN",
            "this node is shutting down; connect to another node",
        );
    }
    let server = &node.config.server;
    if state.tracker.live() >= server.max_connections {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "NODE_FULL",
            &format!(
                "this node holds its maximum of {} connections; try another node",
                server.max_connections
            ),
        );
    }
    // Devices on other nodes from presence (none known when it does not answer); this
    // node's own are counted and taken in one step. Two connects at the same instant on two
    // nodes can still pass together: the cap is exact per node.
    let elsewhere = match node.backends.presence.devices(&identity.user_id).await {
        Ok(d) => d.iter().filter(|d| d.node_id != node.node_id).count(),
        Err(_) => 0,
    };
    let admission = match node.sessions.admissions.admit(
        &identity.user_id,
        elsewhere,
        server.max_devices_per_user,
    ) {
        Ok(admission) => admission,
        Err(devices) => {
            return json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_DEVICES",
                &format!(
                    "this user already has {devices} devices online (the limit is {})",
                    server.max_devices_per_user
                ),
            )
        }
    };
    let max = server.max_frame_bytes;
    // Small per-connection buffers: tungstenite's 128 KiB defaults would make an idle
    // connection cost ~135 KiB; they grow when a larger message needs it.
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(|e| tracing::warn!("WebSocket upgrade failed: {e}"))
        .on_upgrade(move |socket: WebSocket| async move {
            let _guard = state.tracker.enter();
            let _admission = admission;
            let (sink, stream) = socket.split();
            run_session(state.node, identity, sink, stream).await;
        })
        .into_response()
}

/// One session from `CONNECTED` to close. Generic over the socket halves so that it does not
/// depend on how the socket was made.
pub async fn run_session<Si, St>(node: Arc<Node>, identity: Identity, sink: Si, mut stream: St)
where
    Si: Sink<Message, Error = axum::Error> + Send + Unpin + 'static,
    St: Stream<Item = Result<Message, axum::Error>> + Send + Unpin,
{
    node.metrics.connections_total.inc();
    let user_id = identity.user_id;
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
            rate_limit_per_sec: server.rate_limit_per_sec,
            rate_limit_burst: server.rate_limit_burst,
        },
    )
    .await;
    // Without `since`, the session starts at the newest seq asked now, before it is
    // registered; what is stored from then on reaches it live or from the store.
    let newest = match identity.since {
        Some(_) => None,
        None => node.inbox_position(&user_id).await,
    };
    node.sessions.add(handle.clone());
    // Registered first, then the store asked: no live frame falls between the two.
    node.begin_sync(&handle, identity.since, newest);
    node.register(&handle).await;
    tracing::info!(user = %user_id, connection = %connection_id, "connected");

    let writer = tokio::spawn(write_loop(
        sink,
        ends.outbox,
        ends.close.clone(),
        Stuck {
            node: node.clone(),
            closer: handle.closer(),
        },
    ));
    let mut close = ends.close;
    let mut shutdown = node.shutdown_signal();
    if *shutdown.borrow_and_update() {
        handle.request_close(1001, "server shutting down");
    }
    let idle = Duration::from_millis(server.idle_timeout_ms);
    let mut rate = FrameLimit::new(
        server.rate_limit_per_sec,
        server.rate_limit_burst,
        Duration::from_millis(server.rate_limit_grace_ms),
        server.rate_limit_strikes,
    );
    // A token's expiry ends the session; without a token, a deadline that never comes.
    let expiry = identity.expires_at.map(|exp| {
        let left = Duration::from_millis(((exp * 1000) - now_ms()).max(0) as u64);
        tokio::time::Instant::now() + left
    });
    let expired = async move {
        match expiry {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let ctx = ParseContext {
        user_id: &user_id,
        max_content_chars: server.max_content_chars,
    };
    // Chat messages of this connection on their way (stored, routed, not yet acked).
    // Never more than its queue holds: their acks must fit in it.
    let mut in_flight = InFlight::new(server.max_in_flight.min(server.send_queue_len));

    let ended = loop {
        tokio::select! {
            _ = close.changed() => break "closed by the server",
            _ = &mut expired => {
                handle.request_close(1008, "token expired; reconnect with a new token");
                break "token expired";
            }
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
                Ok(Some(Ok(Message::Text(text)))) => {
                    let verdict = rate.check();
                    if verdict == Verdict::Allow {
                        // Boxed: a frame's handling (a store call awaited) is far larger than
                        // the idle session; inline, every idle connection's task held room for it.
                        Box::pin(handle_text(&node, &handle, &text, ctx, &mut in_flight)).await;
                    } else if verdict == Verdict::Close {
                        handle.request_close(1008, "rate limit exceeded again and again");
                        break "flooding";
                    } else {
                        let temp = match parse_client_frame(&text, ctx) {
                            Ok(ClientFrame::Chat(send)) => send.temp_message_id,
                            _ => None,
                        };
                        let e = FrameError {
                            code: ErrorCode::RateLimited,
                            message: format!(
                                "more than {} frames a second; this frame was dropped, send it again later",
                                server.rate_limit_per_sec
                            ),
                            temp_message_id: temp,
                            missed: None,
                        };
                        node.reply_error(&handle, &e).await;
                    }
                }
                Ok(Some(Ok(Message::Binary(_)))) => {
                    handle.request_close(1003, "binary frames are not supported: send JSON text frames");
                    break "binary frame";
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(Message::Close(frame)))) => {
                    // Complete the close handshake: echo the client's code (RFC 6455 5.5.1).
                    let code = frame.map(|f| f.code).unwrap_or(1000);
                    handle.request_close(code, "");
                    break "closed by the client";
                }
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
        node.metrics.presence_failures.inc();
        tracing::warn!(user = %user_id, "presence not cleared: {e}");
    }
    drop(handle);
    // The writer drains what is queued (or sends the close frame) and stops; not forever.
    let abort = writer.abort_handle();
    let writer_done = async {
        if tokio::time::timeout(WRITE_TIMEOUT, writer).await.is_err() {
            abort.abort();
        }
    };
    // Lingering close (RFC 6455 7.1.1): when the server closes, what the client still sends
    // is read and dropped, until its close frame or LINGER. A socket dropped with unread
    // input is answered with a reset, and the client loses our close frame and every frame
    // queued before it (its RATE_LIMITED errors, say). Read while the writer drains, so that
    // a client blocked on writing gets to read.
    let linger = !matches!(
        ended,
        // Shutdown too: the process is about to exit, and a restart should not wait.
        "peer went away" | "closed by the client" | "protocol error" | "server shutting down"
    );
    let drain = async {
        if linger {
            let _ = tokio::time::timeout(LINGER, async {
                while let Some(Ok(message)) = stream.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    };
    tokio::join!(writer_done, drain);
    tracing::info!(user = %user_id, connection = %connection_id, reason = ended, "disconnected");
}

async fn handle_text(
    node: &Node,
    handle: &SessionHandle,
    text: &str,
    ctx: ParseContext<'_>,
    in_flight: &mut InFlight,
) {
    match parse_client_frame(text, ctx) {
        Err(e) => node.reply_error(handle, &e).await,
        Ok(ClientFrame::Chat(send)) => {
            // At the limit, this connection is not read until an earlier message is acked.
            node.submit_chat(handle, send, in_flight).await
        }
        Ok(ClientFrame::Sync { since }) => node.handle_sync(handle, since),
        Ok(ClientFrame::History {
            chat_id,
            before,
            limit,
        }) => {
            node.handle_history(handle, &chat_id, before.as_deref(), limit)
                .await
        }
        Ok(ClientFrame::Heartbeat) => {
            node.heartbeat_probe(handle);
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
            group,
        }) => {
            node.handle_typing(handle, &receiver_id, &chat_id, typing, group)
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

/// Who to tell when writes to the socket stop going through.
struct Stuck {
    node: Arc<Node>,
    /// Not the handle: holding it would keep the queue open after the session ends.
    closer: Closer,
}

async fn write_loop<Si>(
    mut sink: Si,
    mut outbox: outbox::Receiver<Utf8Bytes>,
    mut close: watch::Receiver<Option<CloseReason>>,
    stuck: Stuck,
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
                        if r.is_err() {
                            // The peer has not read for WRITE_TIMEOUT: the session ends, so
                            // that its frames wait in the store, not here.
                            stuck.node.metrics.slow_consumers_closed.inc();
                            stuck.closer.request_close(1013, "slow consumer: nothing read for 10 s; reconnect");
                        }
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
        // What was queued before the close goes out first, for as long as the peer takes it
        // (bounded): a client closed for flooding sees its RATE_LIMITED errors, then 1008.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(frame) = outbox.try_recv() {
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            let _ = sink.flush().await;
        })
        .await;
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
    }
    // Whatever the WebSocket layer queued by itself (a pong, the reply to a close) goes out.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.flush()).await;
}

/// Writes `first` and whatever else is already queued (up to a batch), then flushes once.
async fn write_batch<Si>(
    sink: &mut Si,
    first: Utf8Bytes,
    outbox: &mut outbox::Receiver<Utf8Bytes>,
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
