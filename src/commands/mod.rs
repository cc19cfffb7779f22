//! One module per subcommand, each with its own arguments and one `run`; what several of
//! them share is in `shared` (re-exported here).

pub mod bench;
pub mod completions;
pub mod connect;
pub mod crossnode;
pub mod message_service;
pub mod presence;
pub mod send;
pub mod serve;
mod shared;
pub mod spawn;
pub mod stats;
pub mod store;
pub mod token;

pub use shared::*;
