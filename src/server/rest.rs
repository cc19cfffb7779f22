//! REST: health, a user's online status, the node's stats, and the test page.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::chat::ids::now_ms;
use crate::protocol::is_valid_user_id;

const TEST_PAGE: &str = include_str!("test.html");

/// An error body every endpoint shares: a stable `error` code and a sentence for people.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({ "error": code, "message": message }))).into_response()
}

fn check(result: Result<(), impl std::fmt::Display>, backend: &str) -> Value {
    match result {
        Ok(()) => json!({ "status": "UP", "backend": backend }),
        Err(e) => json!({ "status": "DOWN", "backend": backend, "error": e.to_string() }),
    }
}

/// `UP` when every dependency answers, `DEGRADED` when one does not (the node still serves
/// what it can locally), `DOWN` while shutting down (HTTP 503, so load balancers drain it).
pub async fn health(State(state): State<AppState>) -> Response {
    let b = &state.node.backends;
    let (presence, broker, store) =
        tokio::join!(b.presence.health(), b.bus.health(), b.store.health());
    let all_up = presence.is_ok() && broker.is_ok() && store.is_ok();
    let checks = json!({
        "presence": check(presence, b.presence.name()),
        "broker": check(broker, b.bus.name()),
        "store": check(store, b.store.name()),
    });
    let (status, code) = if state.node.is_shutting_down() {
        ("DOWN", StatusCode::SERVICE_UNAVAILABLE)
    } else if all_up {
        ("UP", StatusCode::OK)
    } else {
        ("DEGRADED", StatusCode::OK)
    };
    let body = json!({
        "status": status,
        "service": "chatd",
        "version": env!("CARGO_PKG_VERSION"),
        "nodeId": state.node.node_id,
        "timestamp": now_ms(),
        "checks": checks,
    });
    (code, Json(body)).into_response()
}

pub async fn online_status(State(state): State<AppState>, Path(user_id): Path<String>) -> Response {
    if !is_valid_user_id(&user_id) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "INVALID_USER_ID",
            "userId must be 1-64 characters of A-Z a-z 0-9 _ . : @ -",
        );
    }
    let devices = match state.node.backends.presence.devices(&user_id).await {
        Ok(d) => d,
        Err(e) => {
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "PRESENCE_UNAVAILABLE",
                &e.to_string(),
            )
        }
    };
    let mut nodes: Vec<&str> = devices.iter().map(|d| d.node_id.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    Json(json!({
        "userId": user_id,
        "online": !devices.is_empty(),
        "nodes": nodes,
        "devices": devices.len(),
        "timestamp": now_ms(),
    }))
    .into_response()
}

pub async fn online_stats(State(state): State<AppState>) -> Response {
    let node = &state.node;
    // The cluster-wide count comes from presence; if it does not answer, say so with null
    // rather than a made-up number.
    let total = node.backends.presence.online_user_count().await.ok();
    Json(json!({
        "totalOnlineUsers": total,
        "localOnlineUsers": node.sessions.user_count(),
        "activeWebSocketSessions": node.sessions.session_count(),
        "nodeId": node.node_id,
        "timestamp": now_ms(),
        "messages": node.metrics.snapshot(),
    }))
    .into_response()
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let body = node
        .metrics
        .render_prometheus(node.sessions.session_count(), node.sessions.user_count());
    (
        [(header::CONTENT_TYPE, crate::chat::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

pub async fn test_page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        TEST_PAGE,
    )
        .into_response()
}

/// Browsers ask for it on every page; no icon, and no 404 in their console.
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub async fn not_found() -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "no such path; try /ws/chat?userId=U, /api/chat/health, /api/chat/online/status/U, \
         /api/chat/online/stats or /test.html",
    )
}
