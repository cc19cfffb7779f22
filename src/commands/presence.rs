//! `chatd presence USER...`: where each user is online, read straight from Redis: each node
//! with its device count and the age of the freshest heartbeat. A table, or `--json`.

use std::collections::BTreeMap;

use clap::Args;
use serde_json::json;

use super::RedisArgs;
use crate::chat::ids::now_ms;
use crate::presence::Presence;

#[derive(Debug, Args)]
pub struct PresenceArgs {
    /// The users to look up
    #[arg(required = true, value_name = "USER")]
    pub users: Vec<String>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Machine output
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: PresenceArgs) -> anyhow::Result<()> {
    let config = args.redis.load()?;
    let presence = args.redis.presence(&config)?;
    presence
        .health()
        .await
        .map_err(|e| anyhow::anyhow!("{e} (url {})", config.redis.url))?;
    let now = now_ms();
    let mut report = Vec::new();
    for user in &args.users {
        let devices = presence.devices(user).await?;
        let mut nodes: BTreeMap<String, (usize, i64)> = BTreeMap::new();
        for d in &devices {
            let entry = nodes.entry(d.node_id.clone()).or_insert((0, 0));
            entry.0 += 1;
            entry.1 = entry.1.max(d.last_seen_ms);
        }
        let nodes: Vec<_> = nodes
            .into_iter()
            .map(|(node, (devices, seen))| {
                json!({"nodeId": node, "devices": devices, "lastHeartbeatAgeMs": now - seen})
            })
            .collect();
        report.push(json!({"userId": user, "online": !devices.is_empty(), "nodes": nodes}));
    }
    if args.json {
        println!("{}", serde_json::Value::Array(report));
        return Ok(());
    }
    let mut table = super::table(["user", "online", "node", "devices", "last heartbeat"]);
    for user in &report {
        let id = user["userId"].as_str().unwrap_or("");
        let nodes = user["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.is_empty() {
            table.add_row([id, "no", "-", "0", "-"]);
        }
        for n in nodes {
            let age = n["lastHeartbeatAgeMs"].as_i64().unwrap_or(0);
            table.add_row([
                id.to_string(),
                "yes".into(),
                n["nodeId"].as_str().unwrap_or("").to_string(),
                n["devices"].to_string(),
                format!("{:.1} s ago", age as f64 / 1000.0),
            ]);
        }
    }
    println!("{table}");
    Ok(())
}
