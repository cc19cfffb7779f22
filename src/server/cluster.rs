//! The cluster at a glance, for `chatd stats` and the operator dashboard (`/api/cluster`):
//! every node (from the Redis leases, or given), what it answers on its stats and health
//! endpoints (a node that does not answer is down), its topic's size and lag on the broker,
//! and the cluster's totals. Counters only: never a message's content.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::config::KafkaConfig;
use crate::presence::Presence;

/// How long a node may take to answer before it is shown as down.
const NODE_WAIT: Duration = Duration::from_secs(3);

/// The report of `nodes` (their id if known, and REST URL); `presence` gives the cluster's
/// online users and Redis's health, `kafka` (if it names brokers) each node's topic.
pub async fn report(
    presence: &dyn Presence,
    kafka: &KafkaConfig,
    nodes: &[(Option<String>, String)],
) -> Value {
    let rows = join_all(
        nodes
            .iter()
            .map(|(id, url)| node_row(kafka, id.clone(), url)),
    )
    .await;
    let (redis_up, total_users) = tokio::join!(presence.health(), presence.online_user_count());
    json!({
        "nodes": rows,
        "cluster": {
            "nodesUp": rows.iter().filter(|r| r["up"] == true).count(),
            "nodesKnown": rows.len(),
            "onlineUsers": total_users.ok(),
            "redis": match &redis_up { Ok(()) => "UP".to_string(), Err(e) => format!("DOWN: {e}") },
        },
        "timestamp": crate::chat::ids::now_ms(),
    })
}

/// Every node holding a lease: (id, REST URL).
pub async fn leased_nodes(
    presence: &dyn Presence,
) -> anyhow::Result<Vec<(Option<String>, String)>> {
    let live = presence
        .nodes()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list nodes from Redis: {e}"))?;
    Ok(live.into_iter().map(|(id, url)| (Some(id), url)).collect())
}

async fn node_row(kafka: &KafkaConfig, id: Option<String>, url: &str) -> Value {
    let (stats, health) = tokio::join!(
        get_json(url, "/api/chat/online/stats"),
        get_json(url, "/api/chat/health")
    );
    let node_id = stats
        .as_ref()
        .and_then(|s| s["nodeId"].as_str().map(String::from))
        .or(id);
    let (lag, records) = match (&node_id, kafka.is_cluster()) {
        (Some(node), true) => topic(kafka, node).await,
        _ => (Value::Null, Value::Null),
    };
    json!({
        "nodeId": node_id,
        "url": url,
        "up": stats.is_some(),
        "sessions": stats.as_ref().map(|s| s["activeWebSocketSessions"].clone()),
        "localUsers": stats.as_ref().map(|s| s["localOnlineUsers"].clone()),
        "messages": stats.as_ref().map(|s| s["messages"].clone()),
        "health": health.as_ref().map(|h| json!({
            "status": h["status"],
            "presence": h["checks"]["presence"]["status"],
            "broker": h["checks"]["broker"]["status"],
            "store": h["checks"]["store"]["status"],
        })),
        "topicLag": lag,
        "topicRecords": records,
    })
}

/// A node's answer on `path`, if it gave a JSON one (health answers 503 while it stops).
async fn get_json(url: &str, path: &str) -> Option<Value> {
    match crate::http::get(url, path, NODE_WAIT).await {
        Ok((200 | 503, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// The node's topic: (lag, records), each a number or why it is unknown.
async fn topic(kafka: &KafkaConfig, node: &str) -> (Value, Value) {
    let (kafka, node) = (kafka.clone(), node.to_string());
    match tokio::task::spawn_blocking(move || crate::bus::topic_state(&kafka, &node)).await {
        Ok(Ok(t)) => (
            match t.committed {
                Some(c) => json!((t.records - c).max(0)),
                None => json!("no commit yet"),
            },
            json!(t.records),
        ),
        Ok(Err(e)) => (json!(format!("unknown: {e}")), Value::Null),
        Err(e) => (json!(format!("unknown: {e}")), Value::Null),
    }
}
