//! What several commands share: the config layers they read, where the operator commands
//! find Redis, tables for people, the client commands' defaults, waiting for SIGINT/SIGTERM,
//! and the line a server logs once it listens.

use std::path::PathBuf;

use clap::Args;

use crate::config::{chatd_env, Config, ConfigError, Overrides, Sources};
use crate::presence::RedisPresence;

/// The config layers a command reads: `--profile`, `--config`, `--config-dir`, and the
/// `CHATD_*` environment.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)
    #[arg(long)]
    pub profile: Option<String>,
    /// A config file read over the profile
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of default.toml and the profiles
    #[arg(long, value_name = "DIR", default_value = "config")]
    pub config_dir: PathBuf,
}

impl ConfigArgs {
    pub fn load(&self, overrides: Overrides) -> Result<Config, ConfigError> {
        Config::load(&Sources {
            config_dir: self.config_dir.clone(),
            profile: self.profile.clone(),
            file: self.config.clone(),
            env: chatd_env(),
            overrides,
        })
    }
}

/// A table for people: condensed borders, and no styling when stdout is not a terminal.
pub fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    use std::io::IsTerminal;
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    if !std::io::stdout().is_terminal() {
        table.force_no_tty();
    }
    table.set_header(header);
    table
}

/// Default node URL of the client commands: the embedded node on this machine.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:9430";

/// A chat id both sides compute alike when none is given: the two user ids, sorted.
pub fn default_chat_id(a: &str, b: &str) -> String {
    if a <= b {
        format!("{a}_{b}")
    } else {
        format!("{b}_{a}")
    }
}

/// Where the operator commands find Redis: `--redis URL`, else the layered config.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://:redis123@127.0.0.1:6379/0 (default: from the config)
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// The --redis URL (one or more, comma-separated) names seed nodes of a Redis Cluster
    #[arg(long)]
    pub redis_cluster: bool,
    #[command(flatten)]
    pub layers: ConfigArgs,
}

impl RedisArgs {
    /// The layered config with `--redis` applied.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = self.layers.load(Overrides::default())?;
        if let Some(url) = &self.redis {
            config.redis.url = url.clone();
        }
        if self.redis_cluster {
            config.redis.cluster = true;
        }
        if self.redis.is_some() || self.redis_cluster {
            config.validate()?;
        }
        Ok(config)
    }

    pub fn presence(&self, config: &Config) -> anyhow::Result<RedisPresence> {
        Ok(RedisPresence::from_config(config)?)
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
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

/// What `chatd serve` (and `chatd message-service`) log once they listen; whoever starts one
/// looks for it in its log.
pub const LISTENING: &str = "chatd listening on ";
