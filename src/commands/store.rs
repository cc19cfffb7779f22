//! `chatd store migrate`: moves a single Redis store to the current key layout (the one that
//! runs on Redis Cluster too), once, with every node and MessageService stopped. See
//! `store::migrate` and the README's "Upgrading".

use clap::{Args, Subcommand};
use serde_json::json;

use super::RedisArgs;
use crate::config::{RedisConfig, StoreBackend};
use crate::redis_client::RedisClient;
use crate::store::migrate;

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub action: StoreAction,
}

#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// Move a Redis store's keys from the layout before Redis Cluster support to the current
    /// one (stop every node and MessageService first); safe to run again
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store's Redis (default: --redis, else a redis:// store.url, else redis.url)
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Machine output
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    let StoreAction::Migrate(args) = args.action;
    let config = args.redis.load()?;
    let url = match (&args.redis.redis, config.store.backend()) {
        (None, Ok(StoreBackend::Redis(url))) => url,
        _ => config.redis.url.clone(),
    };
    let redis = RedisClient::new(&RedisConfig {
        url,
        ..config.redis.clone()
    })?;
    redis.ping().await?;
    let moved = migrate::migrate(&redis).await?;
    if args.json {
        let report: serde_json::Map<String, serde_json::Value> = moved
            .iter()
            .map(|(pattern, n)| (pattern.to_string(), json!(n)))
            .collect();
        println!("{}", serde_json::Value::Object(report));
    } else {
        let mut table = super::table(["old keys", "moved"]);
        for (pattern, n) in &moved {
            table.add_row(vec![pattern.to_string(), n.to_string()]);
        }
        println!("{table}");
        println!(
            "the store is in the current layout ({} = 2)",
            migrate::LAYOUT
        );
    }
    Ok(())
}
