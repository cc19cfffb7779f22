//! `chatd stats`: the cluster at a glance. One row per node (from its
//! `/api/chat/online/stats`; nodes found from their Redis leases or given with `--node`),
//! cluster totals from Redis, and each node's topic lag from the broker (the seed's
//! `mqadmin consumerProgress`). A node that does not answer is shown as down.

use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::RedisArgs;
use crate::presence::Presence;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A node's URL (repeatable; default: every node holding a lease in Redis)
    #[arg(long = "node", value_name = "URL")]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Machine output
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let config = args.redis.load()?;
    let presence = args.redis.presence(&config)?;
    let redis_up = presence.health().await;

    // Nodes: given, or every live lease (node id -> REST URL).
    let nodes: Vec<(Option<String>, String)> = if args.nodes.is_empty() {
        let live = presence.nodes().await.map_err(|e| {
            anyhow::anyhow!("no --node given and cannot list nodes from Redis: {e}")
        })?;
        live.into_iter().map(|(id, url)| (Some(id), url)).collect()
    } else {
        args.nodes.iter().map(|u| (None, u.clone())).collect()
    };

    let mut rows = Vec::new();
    for (id, url) in &nodes {
        let answer = crate::http::get(url, "/api/chat/online/stats", Duration::from_secs(3)).await;
        let stats: Option<Value> = match answer {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        };
        let node_id = stats
            .as_ref()
            .and_then(|s| s["nodeId"].as_str().map(String::from))
            .or_else(|| id.clone());
        let (lag, records) = match (&node_id, !config.kafka.is_cluster()) {
            (Some(node), false) => {
                let (kafka, node) = (config.kafka.clone(), node.clone());
                match tokio::task::spawn_blocking(move || crate::bus::topic_state(&kafka, &node))
                    .await
                {
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
            _ => (Value::Null, Value::Null),
        };
        rows.push(json!({
            "nodeId": node_id,
            "url": url,
            "up": stats.is_some(),
            "sessions": stats.as_ref().map(|s| s["activeWebSocketSessions"].clone()),
            "localUsers": stats.as_ref().map(|s| s["localOnlineUsers"].clone()),
            "messages": stats.as_ref().map(|s| s["messages"].clone()),
            "topicLag": lag,
            "topicRecords": records,
        }));
    }
    let total_users = presence.online_user_count().await.ok();
    let report = json!({
        "nodes": rows,
        "cluster": {
            "nodesUp": rows.iter().filter(|r| r["up"] == true).count(),
            "nodesKnown": rows.len(),
            "onlineUsers": total_users,
            "redis": match &redis_up { Ok(()) => "UP".to_string(), Err(e) => format!("DOWN: {e}") },
        },
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mut table = super::table([
        "node",
        "url",
        "state",
        "sessions",
        "users here",
        "msgs in",
        "routed out",
        "consumed",
        "topic records",
        "topic lag",
    ]);
    let show = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    for r in report["nodes"].as_array().into_iter().flatten() {
        let m = &r["messages"];
        table.add_row([
            show(&r["nodeId"]),
            show(&r["url"]),
            if r["up"] == true {
                "up".into()
            } else {
                "DOWN".into()
            },
            show(&r["sessions"]),
            show(&r["localUsers"]),
            show(&m["messagesReceived"]),
            show(&m["messagesRoutedRemote"]),
            show(&m["envelopesConsumed"]),
            show(&r["topicRecords"]),
            show(&r["topicLag"]),
        ]);
    }
    println!("{table}");
    let c = &report["cluster"];
    println!(
        "cluster: {} of {} nodes up, {} users online, redis {}",
        c["nodesUp"],
        c["nodesKnown"],
        show(&c["onlineUsers"]),
        show(&c["redis"])
    );
    Ok(())
}
