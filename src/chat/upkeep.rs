//! This node's place in presence: its devices (registered at connect, refreshed all at once
//! every third of `presence.ttl_secs`, registered again when presence lost them) and its
//! lease.

use super::ids;
use super::registry::SessionHandle;
use super::Node;
use crate::presence::Device;

/// Devices refreshed in one call to presence (one round trip; a few script calls).
const REFRESH_BATCH: usize = 4096;

impl Node {
    /// Records a local device in presence. A failure is logged and counted; the session goes
    /// on (local delivery does not need presence) and the next refresh tries again.
    pub async fn register(&self, handle: &SessionHandle) {
        let device = Device {
            connection_id: handle.connection_id.to_string(),
            node_id: self.node_id.clone(),
            last_seen_ms: ids::now_ms(),
        };
        if let Err(e) = self
            .backends
            .presence
            .connect(&handle.user_id, device)
            .await
        {
            self.metrics.presence_failures.inc();
            tracing::warn!(user = %handle.user_id, "presence not recorded: {e}");
        }
    }

    /// Refreshes every local device in presence, a batch per call, registering again those
    /// presence lost (Redis restarted, or they were reaped while Redis was unreachable).
    /// Instead of a write per device heartbeat: a heartbeat cost Redis more than a message
    /// (`chatd bench --cluster --heartbeats`).
    pub(super) async fn refresh_devices(&self) {
        let handles = self.sessions.all();
        for batch in handles.chunks(REFRESH_BATCH) {
            let devices: Vec<(&str, &str)> = batch
                .iter()
                .map(|h| (h.user_id.as_ref(), h.connection_id.as_ref()))
                .collect();
            match self.backends.presence.refresh(&devices).await {
                Ok(unknown) => {
                    for h in unknown.into_iter().filter_map(|i| batch.get(i)) {
                        self.register(h).await;
                    }
                }
                Err(e) => {
                    self.metrics.presence_failures.inc();
                    tracing::warn!(
                        devices = batch.len(),
                        "devices not refreshed in presence: {e}"
                    );
                }
            }
        }
    }

    /// Prepares the bus for every other live node (see [`crate::bus::Bus::warm`]).
    pub(super) async fn warm_routes(&self) {
        match self.backends.presence.nodes().await {
            Ok(nodes) => {
                let live: Vec<String> = nodes.into_iter().map(|(id, _)| id).collect();
                let others: Vec<String> = live
                    .iter()
                    .filter(|id| **id != self.node_id)
                    .cloned()
                    .collect();
                self.backends.bus.warm(&others).await;
                self.backends.bus.sweep(&self.node_id, &live).await;
            }
            Err(e) => tracing::debug!("live nodes unknown: {e}"),
        }
    }

    /// Registers every local session again, after presence lost them (Redis restarted or
    /// was unreachable long enough for this node to be reaped).
    async fn resync_presence(&self) {
        let handles = self.sessions.all();
        for h in &handles {
            self.register(h).await;
        }
        tracing::info!(
            sessions = handles.len(),
            "presence is back: local sessions registered again"
        );
    }
}

/// Refreshes this node's devices in presence every third of `presence.ttl_secs` while the
/// node lives (a device not refreshed for `presence.ttl_secs` reads as offline).
pub(super) async fn refresh_presence(node: std::sync::Weak<Node>) {
    let period = match node.upgrade() {
        Some(n) => {
            std::time::Duration::from_millis((n.config.presence.ttl_secs * 1000 / 3).max(100))
        }
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.is_shutting_down() {
            return;
        }
        node.refresh_devices().await;
    }
}

/// Keeps this node's lease while the node lives; when presence was unreachable or lost this
/// node, registers the local sessions again so that routing finds them.
pub(super) async fn maintain_presence(node: std::sync::Weak<Node>) {
    let period = match node.upgrade() {
        Some(n) => std::time::Duration::from_millis(n.config.presence.node_lease_secs * 1000 / 3),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut healthy = true;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.is_shutting_down() {
            return;
        }
        match node
            .backends
            .presence
            .maintain(&node.node_id, &node.advertise_url())
            .await
        {
            Ok(lost) => {
                if lost || !healthy {
                    node.resync_presence().await;
                }
                healthy = true;
                node.warm_routes().await;
            }
            Err(e) => {
                if healthy {
                    tracing::error!(
                        "presence unreachable: {e}; delivering locally until it is back"
                    );
                }
                healthy = false;
                node.metrics.presence_failures.inc();
            }
        }
    }
}
