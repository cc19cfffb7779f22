//! Counters of this node, read by `/api/chat/online/stats` and `/metrics`. Relaxed atomics: each is
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
    /// Offline-push windows closed without an event because the user came back.
    pub offline_pushes_cancelled: AtomicU64,
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
    /// Inbox entries fetched from the store to catch devices up (sync, gaps).
    pub messages_replayed: AtomicU64,
    /// Catch-ups that found the store no longer keeps what a device missed (`SYNC_TOO_OLD`).
    pub sync_too_old: AtomicU64,
    /// Acknowledged messages by route.
    pub route_local: AtomicU64,
    pub route_remote: AtomicU64,
    pub route_local_remote: AtomicU64,
    pub route_offline: AtomicU64,
    /// Time to publish one envelope to another node.
    pub publish_latency: Histogram,
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
    pub offline_pushes_cancelled: u64,
    pub frames_rejected: u64,
    pub store_failures: u64,
    pub bus_failures: u64,
    pub presence_failures: u64,
    pub typing_dropped: u64,
    pub slow_consumers_closed: u64,
    pub connections_total: u64,
    pub messages_replayed: u64,
    pub sync_too_old: u64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            messages_received: r(&self.messages_received),
            messages_delivered_local: r(&self.messages_delivered_local),
            messages_routed_remote: r(&self.messages_routed_remote),
            envelopes_consumed: r(&self.envelopes_consumed),
            offline_pushes: r(&self.offline_pushes),
            offline_pushes_cancelled: r(&self.offline_pushes_cancelled),
            frames_rejected: r(&self.frames_rejected),
            store_failures: r(&self.store_failures),
            bus_failures: r(&self.bus_failures),
            presence_failures: r(&self.presence_failures),
            typing_dropped: r(&self.typing_dropped),
            slow_consumers_closed: r(&self.slow_consumers_closed),
            connections_total: r(&self.connections_total),
            messages_replayed: r(&self.messages_replayed),
            sync_too_old: r(&self.sync_too_old),
        }
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A Prometheus histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Latency of every Redis call of this process (presence and store share the client).
pub static REDIS_CALLS: Histogram = Histogram {
    counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
    sum_micros: AtomicU64::new(0),
};

impl Metrics {
    /// The node's metrics in Prometheus text format; `sessions` and `users` are gauges the
    /// caller reads from the registry.
    pub fn render_prometheus(&self, sessions: usize, users: usize) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut one = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        one(
            "chatd_websocket_sessions",
            "gauge",
            "Open WebSocket sessions on this node.",
            &[("", sessions as u64)],
        );
        one(
            "chatd_online_users_local",
            "gauge",
            "Users with a device on this node.",
            &[("", users as u64)],
        );
        one(
            "chatd_connections_total",
            "counter",
            "WebSocket sessions accepted.",
            &[("", r(&self.connections_total))],
        );
        one(
            "chatd_messages_received_total",
            "counter",
            "Chat messages stored from local devices.",
            &[("", r(&self.messages_received))],
        );
        one(
            "chatd_messages_acked_total",
            "counter",
            "Chat messages acknowledged, by how they reached the receiver.",
            &[
                ("{route=\"local\"}", r(&self.route_local)),
                ("{route=\"remote\"}", r(&self.route_remote)),
                ("{route=\"local+remote\"}", r(&self.route_local_remote)),
                ("{route=\"offline\"}", r(&self.route_offline)),
            ],
        );
        one(
            "chatd_frames_delivered_local_total",
            "counter",
            "Chat frames queued to devices on this node.",
            &[("", r(&self.messages_delivered_local))],
        );
        one(
            "chatd_envelopes_published_total",
            "counter",
            "Envelopes published to other nodes.",
            &[("", r(&self.messages_routed_remote))],
        );
        one(
            "chatd_envelopes_consumed_total",
            "counter",
            "Envelopes consumed from this node's topic.",
            &[("", r(&self.envelopes_consumed))],
        );
        one(
            "chatd_broker_publish_failures_total",
            "counter",
            "Publishes to other nodes or offline pushes that failed.",
            &[("", r(&self.bus_failures))],
        );
        one(
            "chatd_offline_pushes_total",
            "counter",
            "Offline-push events emitted.",
            &[("", r(&self.offline_pushes))],
        );
        one(
            "chatd_offline_pushes_cancelled_total",
            "counter",
            "Offline-push windows closed without an event because the user came back.",
            &[("", r(&self.offline_pushes_cancelled))],
        );
        one(
            "chatd_frames_rejected_total",
            "counter",
            "Client frames answered with ERROR.",
            &[("", r(&self.frames_rejected))],
        );
        one(
            "chatd_frames_dropped_total",
            "counter",
            "Frames dropped for devices that could not keep up.",
            &[("{kind=\"typing\"}", r(&self.typing_dropped))],
        );
        one(
            "chatd_slow_consumers_closed_total",
            "counter",
            "Connections closed because they did not read.",
            &[("", r(&self.slow_consumers_closed))],
        );
        one(
            "chatd_store_failures_total",
            "counter",
            "Sends refused because the store failed.",
            &[("", r(&self.store_failures))],
        );
        one(
            "chatd_messages_replayed_total",
            "counter",
            "Inbox entries fetched from the store to catch devices up.",
            &[("", r(&self.messages_replayed))],
        );
        one(
            "chatd_sync_too_old_total",
            "counter",
            "Catch-ups that found entries a device missed no longer kept.",
            &[("", r(&self.sync_too_old))],
        );
        one(
            "chatd_presence_failures_total",
            "counter",
            "Presence calls that failed.",
            &[("", r(&self.presence_failures))],
        );
        self.publish_latency.render(
            &mut out,
            "chatd_broker_publish_duration_seconds",
            "Time to publish one envelope, broker ack included.",
        );
        REDIS_CALLS.render(
            &mut out,
            "chatd_redis_call_duration_seconds",
            "Time of one Redis call, pool wait included.",
        );
        out
    }

    /// Counts an acknowledged message under its route.
    pub fn count_route(&self, route: crate::protocol::Route) {
        use crate::protocol::Route;
        Metrics::inc(match route {
            Route::Local => &self.route_local,
            Route::Remote => &self.route_remote,
            Route::LocalRemote => &self.route_local_remote,
            Route::Offline => &self.route_offline,
        });
    }
}
