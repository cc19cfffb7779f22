//! chatd: a realtime chat service. One binary is both the chat node and the operator's tool.
//!
//! Module map:
//! - [`cli`]: clap definitions and dispatch; [`commands`]: one module per subcommand
//! - [`config`]: layered configuration and its validation
//! - [`auth`]: who may connect: HS256 tokens
//! - [`backoff`]: the wait before another attempt (doubling, capped, with jitter)
//! - [`protocol`]: WebSocket frames: parse, validate, serialize; stable error codes
//! - [`server`]: the axum app: WebSocket sessions, REST, the chat page and the dashboard,
//!   the cluster report, graceful shutdown
//! - [`chat`]: the message path: ids, moderation, routing, local sessions, counters
//! - [`presence`]: who is online where (trait + memory + redis)
//! - [`bus`]: frames between nodes and offline-push events (trait + in-process + kafka)
//! - [`store`]: the message store (trait + memory + redis)
//! - [`redis_client`]: the Redis pool with a deadline on every call
//! - [`client`]: the WebSocket client used by `connect`, `send` and the tests
//! - [`http`]: the small HTTP GET the operator commands use on the REST API
//! - [`rate`]: the token bucket of the rate limit (node) and of pacing (`connect`)

pub mod auth;
pub mod backoff;
pub mod bus;
pub mod chat;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod http;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod redis_client;
pub mod server;
pub mod store;
