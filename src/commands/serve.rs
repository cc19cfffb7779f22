//! `chatd serve`: loads the layered config, builds the backends it names, and runs a node
//! until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;

use crate::chat::{Backends, Node};
use crate::config::{chatd_env, Config, Overrides, Sources};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)
    #[arg(long)]
    pub profile: Option<String>,
    /// A config file read over the profile
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of default.toml and the profiles
    #[arg(long, value_name = "DIR", default_value = "config")]
    pub config_dir: PathBuf,
    /// Port to listen on (overrides every config layer; 0 picks a free port)
    #[arg(long)]
    pub port: Option<u16>,
    /// Node id (overrides every config layer)
    #[arg(long)]
    pub node_id: Option<String>,
    /// Print the effective configuration and exit
    #[arg(long)]
    pub print_config: bool,
}

impl ServeArgs {
    pub fn load_config(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load(&Sources {
            config_dir: self.config_dir.clone(),
            profile: self.profile.clone(),
            file: self.config.clone(),
            env: chatd_env(),
            overrides: Overrides {
                port: self.port,
                node_id: self.node_id.clone(),
            },
        })
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.load_config()?;
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
    let node = Node::start(config, backends).await?;
    tracing::info!(
        node = %node.node_id,
        presence = node.backends.presence.name(),
        bus = node.backends.bus.name(),
        store = node.backends.store.name(),
        "chatd listening on {local} (ws://{local}/ws/chat?userId=U, http://{local}/test.html)"
    );
    if !local.ip().is_loopback() {
        tracing::warn!(
            "listening on {local} without authentication: anyone who reaches this port can \
             connect as any user"
        );
    }
    crate::server::run(listener, node, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
