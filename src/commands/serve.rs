//! `chatd serve`: loads the layered config, builds the backends it names, and runs a node
//! until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;

use super::ConfigArgs;
use crate::chat::{Backends, Node};
use crate::config::{AuthMode, Overrides};

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
    let node = Node::start(config, backends).await?;
    tracing::info!(
        node = %node.node_id,
        presence = node.backends.presence.name(),
        bus = node.backends.bus.name(),
        store = node.backends.store.name(),
        "{LISTENING}{local} (ws://{local}/ws/chat?userId=U, http://{local}/test.html)"
    );
    if node.config.auth.mode == AuthMode::None && !local.ip().is_loopback() {
        tracing::warn!(
            "AUTH IS OFF: listening on {local} with auth.mode = \"none\": anyone who reaches \
             this port can connect as any user; set auth.mode = \"token\" and auth.secret"
        );
    }
    crate::server::run(listener, node, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn shutdown_signal() {
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

/// What `chatd serve` logs once it listens; [`listening_address`] looks for it.
pub const LISTENING: &str = "chatd listening on ";

/// Reads a spawned `chatd serve`'s stderr until it logs its address (`host:port`), or until it
/// reports a fatal error or `within` passes. Keeps draining stderr afterwards so the child never blocks
/// on a full pipe.
pub fn listening_address(
    stderr: std::process::ChildStderr,
    within: std::time::Duration,
) -> Result<String, String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let Some(sender) = &tx else { continue };
            if let Some(rest) = line.split(LISTENING).nth(1) {
                let _ = sender.send(Ok(rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string()));
                tx = None;
            } else if line.starts_with("error:") || line.contains(" ERROR ") {
                // The fatal message main prints, or an error-level log line; a warning that
                // merely mentions an error (a dependency not up yet) is not a failed start.
                let _ = sender.send(Err(line));
                tx = None;
            }
        }
    });
    match rx.recv_timeout(within) {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no \"{}\" line within {within:?}",
            LISTENING.trim()
        )),
    }
}
