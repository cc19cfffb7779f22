//! `chatd stats`: the cluster at a glance. One row per node (from its
//! `/api/chat/online/stats`; nodes found from their Redis leases or given with `--node`),
//! cluster totals from Redis, and each node's topic lag from the broker (the seed's
//! `mqadmin consumerProgress`). A node that does not answer is shown as down.

use clap::Args;
use serde_json::Value;

use super::RedisArgs;
use crate::server::cluster::{leased_nodes, report};

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
    // Nodes: given, or every live lease (node id -> REST URL).
    let nodes = if args.nodes.is_empty() {
        leased_nodes(&presence)
            .await
            .map_err(|e| anyhow::anyhow!("no --node given and {e}"))?
    } else {
        args.nodes.iter().map(|u| (None, u.clone())).collect()
    };
    let report = report(&presence, &config.kafka, &nodes).await;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mut table = super::table([
        "node",
        "url",
        "state",
        "health",
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
            show(&r["health"]["status"]),
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
