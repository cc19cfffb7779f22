//! Presence: which devices of a user are online, on which node. One trait; `memory` is the
//! embedded backend (one process), Redis arrives with the cluster issue.

mod memory;

pub use memory::MemoryPresence;

use async_trait::async_trait;
use serde::Serialize;

/// One connected device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub connection_id: String,
    pub node_id: String,
    /// Last connect or heartbeat, unix milliseconds.
    pub last_seen_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Presence: Send + Sync {
    /// Records a device as online; atomic for the user.
    async fn connect(&self, user_id: &str, device: Device) -> Result<(), PresenceError>;
    /// Removes one device; the user goes offline with its last device.
    async fn disconnect(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError>;
    /// Refreshes a device's last-seen time.
    async fn heartbeat(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError>;
    /// The user's live devices (expired ones are not returned).
    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, PresenceError>;
    /// Users with at least one live device, cluster-wide.
    async fn online_user_count(&self) -> Result<usize, PresenceError>;
    /// Removes every device of a node (graceful shutdown); returns how many.
    async fn clear_node(&self, node_id: &str) -> Result<usize, PresenceError>;
    /// `Ok` when the backend answers.
    async fn health(&self) -> Result<(), PresenceError>;
    /// Backend name for health output.
    fn name(&self) -> &'static str;
}
