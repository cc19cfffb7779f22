//! `chatd serve`: loads the layered config, builds the backends it names, and runs a node
//! until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;

use super::{ConfigArgs, LISTENING};
use crate::chat::{Backends, Node};
use crate::config::{AuthMode, Overrides, RedisConfig, StoreBackend};
use crate::redis_client::RedisClient;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub layers: ConfigArgs,
    /// Port to listen on (overrides every config layer; 0 picks a free port)
    #[arg(long)]
    pub port: Option<u16>,
    /// Node id (overrides every config layer)
    #[arg(long)]
    pub node_id: Option<String>,
    /// Print the effective configuration (secrets redacted) and exit
    #[arg(long)]
    pub print_config: bool,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        port: args.port,
        node_id: args.node_id.clone(),
    };
    let mut config = args.layers.load(overrides)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let addr = format!("{}:{}", config.server.host, config.server.port);
    let listener = TcpListener::bind(&addr).await.with_context(|| {
        format!("cannot listen on {addr}: is another chatd running there? choose another --port")
    })?;
    let local = listener.local_addr()?;
    // The port actually bound (it may have been 0), for the lease and the logs.
    config.server.port = local.port();
    let backends = Backends::from_config(&config)?;
    if let Ok(StoreBackend::Redis(url)) = config.store.backend() {
        let redis = RedisClient::new(&RedisConfig {
            url,
            ..config.redis.clone()
        })?;
        crate::store::migrate::check_at_start(&redis).await?;
    }
    let node = Node::start(config, backends).await?;
    tracing::info!(
        node = %node.node_id,
        presence = node.backends.presence.name(),
        bus = node.backends.bus.name(),
        store = node.backends.store.name(),
        "{LISTENING}{local} (ws://{local}/ws/chat?userId=U, chat page http://{local}/, dashboard http://{local}/dashboard)"
    );
    if node.config.auth.mode == AuthMode::None && !local.ip().is_loopback() {
        tracing::warn!(
            "AUTH IS OFF: listening on {local} with auth.mode = \"none\": anyone who reaches \
             this port can connect as any user; set auth.mode = \"token\" and auth.secret"
        );
    }
    crate::server::run(listener, node, super::shutdown_signal()).await?;
    Ok(())
}
