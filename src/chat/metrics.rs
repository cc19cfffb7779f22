//! Counters of this node, read by `/api/chat/online/stats`. Relaxed atomics: each is
//! independent and only ever read as a snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Chat messages accepted from local devices (stored).
    pub messages_received: AtomicU64,
    /// Chat frames queued to local devices (receivers and sender copies).
    pub messages_delivered_local: AtomicU64,
    /// Envelopes published to other nodes.
    pub messages_routed_remote: AtomicU64,
    /// Envelopes received from other nodes.
    pub envelopes_consumed: AtomicU64,
    /// Offline-push events emitted.
    pub offline_pushes: AtomicU64,
    /// Frames answered with `ERROR`.
    pub frames_rejected: AtomicU64,
    /// Sends refused because the store failed.
    pub store_failures: AtomicU64,
    /// Publishes to other nodes that failed (the message was already stored).
    pub bus_failures: AtomicU64,
    /// Presence calls that failed (delivery went on with local knowledge).
    pub presence_failures: AtomicU64,
    /// Typing frames dropped for devices that could not keep up.
    pub typing_dropped: AtomicU64,
    /// Connections closed because their outgoing queue was full.
    pub slow_consumers_closed: AtomicU64,
    /// WebSocket sessions accepted since start.
    pub connections_total: AtomicU64,
}

/// A snapshot, camelCase as the REST API speaks.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSnapshot {
    pub messages_received: u64,
    pub messages_delivered_local: u64,
    pub messages_routed_remote: u64,
    pub envelopes_consumed: u64,
    pub offline_pushes: u64,
    pub frames_rejected: u64,
    pub store_failures: u64,
    pub bus_failures: u64,
    pub presence_failures: u64,
    pub typing_dropped: u64,
    pub slow_consumers_closed: u64,
    pub connections_total: u64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            messages_received: r(&self.messages_received),
            messages_delivered_local: r(&self.messages_delivered_local),
            messages_routed_remote: r(&self.messages_routed_remote),
            envelopes_consumed: r(&self.envelopes_consumed),
            offline_pushes: r(&self.offline_pushes),
            frames_rejected: r(&self.frames_rejected),
            store_failures: r(&self.store_failures),
            bus_failures: r(&self.bus_failures),
            presence_failures: r(&self.presence_failures),
            typing_dropped: r(&self.typing_dropped),
            slow_consumers_closed: r(&self.slow_consumers_closed),
            connections_total: r(&self.connections_total),
        }
    }
}
