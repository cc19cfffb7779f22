//! One module per subcommand, each with its own arguments and one `run`.

pub mod bench;
pub mod completions;
pub mod connect;
pub mod crossnode;
pub mod message_service;
pub mod presence;
pub mod send;
pub mod serve;
pub mod spawn;
pub mod stats;
pub mod token;

use std::path::PathBuf;

use clap::Args;

use crate::config::{chatd_env, Config, ConfigError, Overrides, Sources};

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
