//! One module per subcommand, each with its own arguments and one `run`.

pub mod completions;
pub mod connect;
pub mod crossnode;
pub mod presence;
pub mod send;
pub mod serve;
pub mod stats;

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
