//! REST: health, a user's online status, the node's stats, the cluster report for operators,
//! and the two pages (the chat page, the operator dashboard).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;
use crate::chat::ids::now_ms;
use crate::protocol::{is_valid_user_id, FrameError};

const CHAT_PAGE: &str = include_str!("chat.html");
const DASHBOARD_PAGE: &str = include_str!("dashboard.html");

/// How long one cluster report serves every dashboard that asks (each costs a request to
/// every node and, with Kafka, a look at every node's topic).
const CLUSTER_REPORT_FOR: std::time::Duration = std::time::Duration::from_secs(2);

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
        "auth": state.node.config.auth.mode,
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

fn html(page: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page,
    )
        .into_response()
}

pub async fn chat_page() -> Response {
    html(CHAT_PAGE)
}

pub async fn dashboard_page() -> Response {
    html(DASHBOARD_PAGE)
}

/// Every node of the cluster and its counters (`chatd stats` as JSON), for the dashboard. In
/// token mode only for a token of a user in `auth.operators` (`Authorization: Bearer` or
/// `?token=`).
pub async fn cluster(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    query: axum::extract::RawQuery,
) -> Response {
    if let Some(refused) = operator(&state.node.config.auth, &headers, query.0.as_deref()) {
        return refused;
    }
    let mut cached = state.cluster.lock().await;
    if let Some((at, report)) = cached.as_ref() {
        if at.elapsed() < CLUSTER_REPORT_FOR {
            return Json(report.clone()).into_response();
        }
    }
    let node = &state.node;
    let presence = node.backends.presence.as_ref();
    let mut nodes = super::cluster::leased_nodes(presence)
        .await
        .unwrap_or_default();
    if !nodes
        .iter()
        .any(|(id, _)| id.as_deref() == Some(node.node_id.as_str()))
    {
        // In-process presence lists no leases; this node is part of the cluster either way.
        nodes.insert(0, (Some(node.node_id.clone()), node.advertise_url()));
    }
    let report = super::cluster::report(presence, &node.config.kafka, &nodes).await;
    *cached = Some((std::time::Instant::now(), report.clone()));
    Json(report).into_response()
}

/// The refusal of a request that may not read operator data; `None` lets it: always in auth
/// mode none, in token mode with a valid token of a user listed in `auth.operators`.
fn operator(
    auth: &crate::config::AuthConfig,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Option<Response> {
    if auth.mode == crate::config::AuthMode::None {
        return None;
    }
    let from_query = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let Some(token) = super::handshake::token_of(headers, from_query.as_deref()) else {
        return Some(json_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "operator data needs a token of a user listed in auth.operators \
             (chatd token --user OPERATOR), as Authorization: Bearer or ?token=",
        ));
    };
    let now = now_ms() / 1000;
    match crate::auth::verify(auth.secret.as_bytes(), &token, now) {
        Err(e) => Some(json_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            &e.to_string(),
        )),
        Ok(claims) if !auth.operators.contains(&claims.sub) => Some(json_error(
            StatusCode::FORBIDDEN,
            "NOT_OPERATOR",
            &format!(
                "user {:?} is not listed in auth.operators; ask for an operator's token",
                claims.sub
            ),
        )),
        Ok(_) => None,
    }
}

/// `GET /api/chat/history/{chatId}?before=ID&limit=N`: a page of the chat's history, newest
/// first, as the `HISTORY` frame carries it. The user is who a WebSocket would be (`?userId=`
/// in auth mode none, the token's user in mode token); 403 for a user with no message in
/// the chat.
pub async fn history(
    State(state): State<AppState>,
    Path(chat_id): Path<String>,
    headers: axum::http::HeaderMap,
    query: axum::extract::RawQuery,
) -> Response {
    let node = &state.node;
    let identity = match super::handshake::admit(
        &node.config,
        query.0.as_deref(),
        &headers,
        now_ms() / 1000,
    ) {
        Ok(identity) => identity,
        Err(refused) => return refused.into_response(),
    };
    // Unknown parameters (`userId`, `token`) are `admit`'s; an empty one counts as absent.
    let q: HistoryQuery = match serde_urlencoded::from_str(query.0.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => {
            let why = format!("cannot read query: {e}");
            return json_error(StatusCode::BAD_REQUEST, "INVALID_QUERY", &why);
        }
    };
    let before = q.before.as_deref().filter(|b| !b.is_empty());
    let limit = match q.limit.as_deref().filter(|l| !l.is_empty()) {
        None => Ok(None),
        Some(l) => l.parse::<u64>().map(Some).map_err(|_| {
            FrameError::new(
                crate::protocol::ErrorCode::InvalidField,
                "`limit` must be a whole number (messages in a page)",
            )
        }),
    };
    let checked = limit
        .and_then(crate::protocol::history_limit)
        .and_then(|limit| {
            crate::protocol::check_id(&chat_id, "chatId")?;
            before.map_or(Ok(()), |b| crate::protocol::check_id(b, "before"))?;
            Ok(limit)
        });
    let limit = match checked {
        Ok(limit) => limit,
        Err(e) => return refusal(&e),
    };
    match node
        .history(&identity.user_id, &chat_id, before, limit)
        .await
    {
        Ok(page) => ([(header::CONTENT_TYPE, "application/json")], page).into_response(),
        Err(e) => refusal(&e),
    }
}

/// The parameters of `GET /api/chat/history/{chatId}` besides the user's.
#[derive(serde::Deserialize)]
struct HistoryQuery {
    before: Option<String>,
    limit: Option<String>,
}

/// A frame error as an HTTP answer: the same code, with the status it means.
pub(super) fn refusal(e: &FrameError) -> Response {
    use crate::protocol::ErrorCode;
    let status = match e.code {
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::UnknownMessage | ErrorCode::UnknownGroup => StatusCode::NOT_FOUND,
        ErrorCode::GroupExists | ErrorCode::GroupFull | ErrorCode::LastAdmin => {
            StatusCode::CONFLICT
        }
        ErrorCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    let code = serde_json::to_value(e.code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    json_error(status, &code, &e.message)
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
         /api/chat/online/stats, /api/chat/history/CHAT?userId=U, /api/groups, \
         /api/groups/GROUP/members, /api/cluster, / (the chat page) or /dashboard",
    )
}
