//! Presence: which devices of a user are online, on which node. One trait; `memory` is the
//! embedded backend (one process), Redis arrives with the cluster issue.

mod memory;
pub mod redis;

pub use self::redis::RedisPresence;
pub use memory::MemoryPresence;

use async_trait::async_trait;
use serde::Serialize;

/// One connected device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub connection_id: String,
    pub node_id: String,
    /// When it connected or its node last refreshed it (every third of `presence.ttl_secs`,
    /// see [`Presence::refresh`]), unix milliseconds.
    pub last_seen_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Redis(#[from] crate::redis_client::RedisError),
}

#[async_trait]
pub trait Presence: Send + Sync {
    /// Records a device as online; atomic for the user.
    async fn connect(&self, user_id: &str, device: Device) -> Result<(), PresenceError>;
    /// Removes one device; the user goes offline with its last device.
    async fn disconnect(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError>;
    /// Refreshes the last-seen time of these (user, connection) devices, all of a node's in one
    /// go (a node does it every third of `presence.ttl_secs`, not at each device's heartbeat:
    /// one call for thousands of devices instead of a fsynced write per heartbeat). Returns
    /// the indexes of the devices presence does not know (lost or reaped): the node registers
    /// them again.
    async fn refresh(&self, devices: &[(&str, &str)]) -> Result<Vec<usize>, PresenceError>;
    /// The user's live devices (expired ones are not returned).
    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, PresenceError>;
    /// The live devices of each user, in the order asked; one round trip where the backend
    /// can (the message path asks for every target of a batch at once).
    async fn devices_many(&self, user_ids: &[&str]) -> Result<Vec<Vec<Device>>, PresenceError> {
        let mut out = Vec::with_capacity(user_ids.len());
        for u in user_ids {
            out.push(self.devices(u).await?);
        }
        Ok(out)
    }
    /// Users with at least one live device, cluster-wide.
    async fn online_user_count(&self) -> Result<usize, PresenceError>;
    /// Removes every device of a node (graceful shutdown); returns how many.
    async fn clear_node(&self, node_id: &str) -> Result<usize, PresenceError>;
    /// `Ok` when the backend answers.
    async fn health(&self) -> Result<(), PresenceError>;
    /// Called every third of the node lease: keeps this node's lease (with its REST URL) and
    /// clears nodes whose lease lapsed. Returns true when presence had lost this node (its
    /// lease was gone), so the node registers its sessions again. Nothing to do for a single
    /// process.
    async fn maintain(&self, _node_id: &str, _url: &str) -> Result<bool, PresenceError> {
        Ok(false)
    }
    /// Live nodes and their REST URLs (cluster backends; empty for a single process).
    async fn nodes(&self) -> Result<Vec<(String, String)>, PresenceError> {
        Ok(Vec::new())
    }
    /// Backend name for health output.
    fn name(&self) -> &'static str;
}
