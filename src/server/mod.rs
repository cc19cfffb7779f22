//! The HTTP side of a node: the axum app (WebSocket endpoint, REST, test page) and its
//! lifecycle. [`run`] takes a bound listener so tests can bind `127.0.0.1:0`.
//!
//! Graceful shutdown does not wait for upgraded WebSockets, so sessions are counted here
//! ([`SessionTracker`]) and closed by the node itself (1001) before `run` returns.

pub mod cluster;
mod groups;
pub mod handshake;
mod rest;
mod ws;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::chat::Node;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub tracker: SessionTracker,
    /// The last cluster report and when it was made (see `rest::cluster`).
    pub cluster: Arc<tokio::sync::Mutex<Option<(std::time::Instant, serde_json::Value)>>>,
}

/// Counts live WebSocket sessions so shutdown can wait for them.
#[derive(Clone, Default)]
pub struct SessionTracker {
    inner: Arc<(AtomicUsize, Notify)>,
}

/// Held by a session task; dropping it marks the session gone.
pub struct SessionGuard(SessionTracker);

impl SessionTracker {
    pub fn enter(&self) -> SessionGuard {
        self.inner.0.fetch_add(1, Ordering::SeqCst);
        SessionGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.inner.0.load(Ordering::SeqCst)
    }

    /// Waits until no session is left.
    pub async fn drained(&self) {
        loop {
            let notified = self.inner.1.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.inner.1.notify_waiters();
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ws/chat", get(ws::upgrade))
        .route("/api/chat/health", get(rest::health))
        .route(
            "/api/chat/online/status/{user_id}",
            get(rest::online_status),
        )
        .route("/api/chat/online/stats", get(rest::online_stats))
        .route("/api/chat/history/{chat_id}", get(rest::history))
        .route("/api/groups", axum::routing::post(groups::create))
        .route(
            "/api/groups/{group_id}/members",
            get(groups::list).post(groups::add),
        )
        .route(
            "/api/groups/{group_id}/members/{user_id}",
            axum::routing::delete(groups::remove),
        )
        .route("/metrics", get(rest::metrics))
        .route("/api/cluster", get(rest::cluster))
        .route("/", get(rest::chat_page))
        .route("/test.html", get(rest::chat_page))
        .route("/dashboard", get(rest::dashboard_page))
        .route("/favicon.ico", get(rest::favicon))
        .fallback(rest::not_found)
        .with_state(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `node` on `listener` until `shutdown` resolves, then stops accepting, closes every
/// session (1001), waits for them up to `server.shutdown_grace_ms`, and clears this node's
/// presence.
///
/// The accept loop is written out (rather than `axum::serve`) for one reason: HTTP/1 needs a
/// header-read timeout, or a client that never finishes its request line holds a socket
/// forever (slowloris), and axum::serve gives hyper no timer to enforce one.
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let tracker = SessionTracker::default();
    let app = router(AppState {
        node: node.clone(),
        tracker: tracker.clone(),
        cluster: Default::default(),
    });
    let header_timeout = Duration::from_millis(node.config.server.header_read_timeout_ms);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let connections = SessionTracker::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let guard = connections.enter();
        tokio::spawn(async move {
            let _guard = guard;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let stopping = async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            };
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }

    tracing::info!("shutting down: closing sessions");
    node.begin_shutdown();
    let _ = stop_tx.send(true);
    let grace = Duration::from_millis(node.config.server.shutdown_grace_ms);
    let drained = async {
        connections.drained().await;
        tracker.drained().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            left = tracker.live(),
            "sessions still open after the grace period"
        );
    }
    node.finish_shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
