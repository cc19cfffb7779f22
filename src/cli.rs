//! The command line: clap types stop here; each subcommand turns its arguments into a
//! validated config or request and runs.

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

use crate::commands;

#[derive(Debug, Parser)]
#[command(
    name = "chatd",
    version,
    about = "Realtime chat: a WebSocket chat node and the operator's tool in one binary",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one chat node (WebSocket on /ws/chat, REST on /api/chat, chat page on /, dashboard on /dashboard)
    Serve(commands::serve::ServeArgs),
    /// Run the MessageService over gRPC (memory or Redis backend)
    #[command(name = "message-service")]
    MessageService(commands::message_service::MessageServiceArgs),
    /// Chat from the terminal: interactive for a person, JSON lines for scripts
    Connect(commands::connect::ConnectArgs),
    /// Send one message (or --count N), wait for the server's ack, exit non-zero on error
    Send(commands::send::SendArgs),
    /// Where users are online: nodes, devices, last heartbeat (reads Redis)
    Presence(commands::presence::PresenceArgs),
    /// The cluster at a glance: nodes, sessions, users, message counters, broker lag
    Stats(commands::stats::StatsArgs),
    /// The Redis store's upkeep: `migrate` moves it to the current key layout
    Store(commands::store::StoreArgs),
    /// Run the seed's cross-node scenarios against two nodes; non-zero exit on any failure
    #[command(name = "crossnode-test")]
    CrossnodeTest(commands::crossnode::CrossnodeArgs),
    /// Measure a node: messages per second, latency, memory per connection
    Bench(commands::bench::BenchArgs),
    /// Print a token (HS256 JWT) for a user, signed with the configured [auth] secret
    Token(commands::token::TokenArgs),
    /// Print shell completions
    Completions(commands::completions::CompletionsArgs),
}

impl Command {
    /// Client commands log less by default than the node.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve(_) | Command::MessageService(_) => "info",
            _ => "warn",
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => commands::serve::run(args).await,
        Command::MessageService(args) => commands::message_service::run(args).await,
        Command::Connect(args) => commands::connect::run(args).await,
        Command::Send(args) => commands::send::run(args).await,
        Command::Presence(args) => commands::presence::run(args).await,
        Command::Stats(args) => commands::stats::run(args).await,
        Command::Store(args) => commands::store::run(args).await,
        Command::CrossnodeTest(args) => commands::crossnode::run(args).await,
        Command::Bench(args) => commands::bench::run(args).await,
        Command::Token(args) => commands::token::run(args),
        Command::Completions(args) => commands::completions::run(args),
    }
}

/// The completion script for `shell`, as committed under `completions/`.
pub fn completions(shell: Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "chatd", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}
