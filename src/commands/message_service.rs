//! `chatd message-service`: the MessageService over gRPC, in front of the in-memory store or
//! the Redis store (durable across restarts when Redis persists).

use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::net::TcpListener;

use super::RedisArgs;
use crate::redis_client::RedisClient;
use crate::store::{self, grpc, Store};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Backend {
    /// In this process: gone when it stops
    Memory,
    /// In Redis ([redis] of the config, or --redis): survives restarts of this service
    Redis,
}

#[derive(Debug, Args)]
pub struct MessageServiceArgs {
    /// Address to listen on (20882 is the seed's Dubbo port)
    #[arg(long, default_value = "127.0.0.1:20882")]
    pub listen: String,
    /// Where messages are kept
    #[arg(long, value_enum, default_value = "memory")]
    pub backend: Backend,
    #[command(flatten)]
    pub redis: RedisArgs,
}

pub async fn run(args: MessageServiceArgs) -> anyhow::Result<()> {
    let config = args.redis.load()?;
    let store: Arc<dyn Store> = match args.backend {
        Backend::Memory => Arc::new(store::memory_store(&config.store)),
        Backend::Redis => {
            let redis = RedisClient::new(&config.redis)?;
            store::migrate::check_at_start(&redis).await?;
            Arc::new(store::redis_store(&config.store, redis))
        }
    };
    if let Err(e) = store.health().await {
        tracing::warn!("the {} backend does not answer yet: {e}", store.name());
    }
    let listener = TcpListener::bind(&args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is a message-service already running?",
            args.listen
        )
    })?;
    let local = listener.local_addr()?;
    tracing::info!(
        backend = store.name(),
        "{}{local} (MessageService over gRPC)",
        super::LISTENING
    );
    tonic::transport::Server::builder()
        .add_service(grpc::Service::new(store))
        .serve_with_incoming_shutdown(
            // Nagle off: a small answer would otherwise wait for the node's delayed ACK, and
            // every save took ~40 ms longer.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            super::shutdown_signal(),
        )
        .await
        .context("MessageService failed")?;
    tracing::info!("stopped");
    Ok(())
}
