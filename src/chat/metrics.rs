//! Counters of this node, read by `/api/chat/online/stats` (JSON) and `/metrics` (Prometheus,
//! through `prometheus-client`). Each plain counter is a field and one row of
//! [`Metrics::counters`], which gives its name in both and its help.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};

use crate::protocol::Route;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Latency of every Redis call of this process (presence and store share the client).
pub static REDIS_CALLS: LazyLock<Histogram> = LazyLock::new(latency_histogram);

/// How an acknowledged message reached its receiver.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    route: &'static str,
}

/// What kind of frame was dropped for a device that could not keep up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    kind: &'static str,
}

const TYPING: KindLabel = KindLabel { kind: "typing" };

#[derive(Debug)]
pub struct Metrics {
    /// Chat messages accepted from local devices (stored).
    pub messages_received: Counter,
    /// Chat frames queued to local devices (receivers and sender copies).
    pub messages_delivered_local: Counter,
    /// Envelopes published to other nodes.
    pub messages_routed_remote: Counter,
    /// Envelopes received from other nodes.
    pub envelopes_consumed: Counter,
    /// Offline-push events emitted.
    pub offline_pushes: Counter,
    /// Offline-push windows closed without an event because the user came back.
    pub offline_pushes_cancelled: Counter,
    /// Frames answered with `ERROR`.
    pub frames_rejected: Counter,
    /// Sends refused because the store failed.
    pub store_failures: Counter,
    /// Publishes to other nodes that failed (the message was already stored).
    pub bus_failures: Counter,
    /// Presence calls that failed (delivery went on with local knowledge).
    pub presence_failures: Counter,
    /// Connections closed because their outgoing queue was full.
    pub slow_consumers_closed: Counter,
    /// WebSocket sessions accepted since start.
    pub connections_total: Counter,
    /// Inbox entries fetched from the store to catch devices up (sync, gaps).
    pub messages_replayed: Counter,
    /// Catch-ups that found the store no longer keeps what a device missed (`SYNC_TOO_OLD`).
    pub sync_too_old: Counter,
    /// Consumers of this node's topic replaced because they stopped handing on frames the
    /// broker held for them.
    pub consumer_restarts: Counter,
    /// Acknowledged messages by route (in [`Route`]'s order), and typing frames dropped for
    /// devices that could not keep up (a chat frame is never dropped): the counters of the
    /// labelled families `chatd_messages_acked` and `chatd_frames_dropped`, held here so that
    /// counting one is an atomic add, not a lookup in the family's map per message.
    by_route: [Counter; 4],
    typing: Counter,
    /// Time to publish one envelope to another node.
    pub publish_latency: Histogram,
    /// Time of one batch's store call (every message of a lane's batch in one call).
    pub store_latency: Histogram,
    /// Time from the arrival of a batch's oldest chat frame to the batch's store call (the
    /// longest wait in the batch): the linger and the wait for the lane's batch before it.
    pub batch_wait: Histogram,
    /// Read from the registry of sessions when rendered.
    sessions: Gauge,
    users: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            messages_received: Counter::default(),
            messages_delivered_local: Counter::default(),
            messages_routed_remote: Counter::default(),
            envelopes_consumed: Counter::default(),
            offline_pushes: Counter::default(),
            offline_pushes_cancelled: Counter::default(),
            frames_rejected: Counter::default(),
            store_failures: Counter::default(),
            bus_failures: Counter::default(),
            presence_failures: Counter::default(),
            slow_consumers_closed: Counter::default(),
            connections_total: Counter::default(),
            messages_replayed: Counter::default(),
            sync_too_old: Counter::default(),
            consumer_restarts: Counter::default(),
            by_route: Default::default(),
            typing: Counter::default(),
            publish_latency: latency_histogram(),
            store_latency: latency_histogram(),
            batch_wait: latency_histogram(),
            sessions: Gauge::default(),
            users: Gauge::default(),
            registry: Registry::default(),
        };
        // Every label value shows from the start, at 0.
        let acked = Family::<RouteLabel, Counter>::default();
        let frames_dropped = Family::<KindLabel, Counter>::default();
        m.typing = frames_dropped.get_or_create(&TYPING).clone();
        for route in [
            Route::Local,
            Route::Remote,
            Route::LocalRemote,
            Route::Offline,
        ] {
            m.by_route[route as usize] = acked.get_or_create(&route_label(route)).clone();
        }
        let mut r = Registry::default();
        r.register(
            "chatd_websocket_sessions",
            "Open WebSocket sessions on this node",
            m.sessions.clone(),
        );
        r.register(
            "chatd_online_users_local",
            "Users with a device on this node",
            m.users.clone(),
        );
        for (_, name, help, counter) in m.counters() {
            r.register(name, help, counter.clone());
        }
        r.register(
            "chatd_messages_acked",
            "Chat messages acknowledged, by how they reached the receiver",
            acked,
        );
        r.register(
            "chatd_frames_dropped",
            "Frames dropped for devices that could not keep up",
            frames_dropped,
        );
        for (name, help, histogram) in [
            (
                "chatd_broker_publish_duration_seconds",
                "Time to publish one envelope, broker ack included",
                &m.publish_latency,
            ),
            (
                "chatd_store_save_duration_seconds",
                "Time of one store call saving a batch of chat messages",
                &m.store_latency,
            ),
            (
                "chatd_batch_wait_duration_seconds",
                "Time from the arrival of a batch's oldest chat message to the batch's store call",
                &m.batch_wait,
            ),
            (
                "chatd_redis_call_duration_seconds",
                "Time of one Redis call, pool wait included",
                &REDIS_CALLS,
            ),
        ] {
            r.register(name, help, histogram.clone());
        }
        m.registry = r;
        m
    }
}

fn route_label(route: Route) -> RouteLabel {
    RouteLabel {
        route: match route {
            Route::Local => "local",
            Route::Remote => "remote",
            Route::LocalRemote => "local+remote",
            Route::Offline => "offline",
        },
    }
}

impl Metrics {
    /// Every plain counter: its key in the REST stats, its Prometheus name (`_total` is
    /// added), its help.
    fn counters(&self) -> [(&'static str, &'static str, &'static str, &Counter); 15] {
        [
            (
                "connectionsTotal",
                "chatd_connections",
                "WebSocket sessions accepted",
                &self.connections_total,
            ),
            (
                "messagesReceived",
                "chatd_messages_received",
                "Chat messages stored from local devices",
                &self.messages_received,
            ),
            (
                "messagesDeliveredLocal",
                "chatd_frames_delivered_local",
                "Chat frames queued to devices on this node",
                &self.messages_delivered_local,
            ),
            (
                "messagesRoutedRemote",
                "chatd_envelopes_published",
                "Envelopes published to other nodes",
                &self.messages_routed_remote,
            ),
            (
                "envelopesConsumed",
                "chatd_envelopes_consumed",
                "Envelopes consumed from this node's topic",
                &self.envelopes_consumed,
            ),
            (
                "busFailures",
                "chatd_broker_publish_failures",
                "Publishes to other nodes or offline pushes that failed",
                &self.bus_failures,
            ),
            (
                "offlinePushes",
                "chatd_offline_pushes",
                "Offline-push events emitted",
                &self.offline_pushes,
            ),
            (
                "offlinePushesCancelled",
                "chatd_offline_pushes_cancelled",
                "Offline-push windows closed without an event because the user came back",
                &self.offline_pushes_cancelled,
            ),
            (
                "framesRejected",
                "chatd_frames_rejected",
                "Client frames answered with ERROR",
                &self.frames_rejected,
            ),
            (
                "slowConsumersClosed",
                "chatd_slow_consumers_closed",
                "Connections closed because they did not read",
                &self.slow_consumers_closed,
            ),
            (
                "storeFailures",
                "chatd_store_failures",
                "Sends refused because the store failed",
                &self.store_failures,
            ),
            (
                "messagesReplayed",
                "chatd_messages_replayed",
                "Inbox entries fetched from the store to catch devices up",
                &self.messages_replayed,
            ),
            (
                "syncTooOld",
                "chatd_sync_too_old",
                "Catch-ups that found entries a device missed no longer kept",
                &self.sync_too_old,
            ),
            (
                "presenceFailures",
                "chatd_presence_failures",
                "Presence calls that failed",
                &self.presence_failures,
            ),
            (
                "consumerRestarts",
                "chatd_broker_consumer_restarts",
                "Consumers of this node's topic replaced because they stopped fetching",
                &self.consumer_restarts,
            ),
        ]
    }

    /// A typing frame dropped for a device that could not keep up.
    pub fn typing_dropped(&self) {
        self.typing.inc();
    }

    /// Counts an acknowledged message under its route.
    pub fn count_route(&self, route: Route) {
        self.by_route[route as usize].inc();
    }

    /// The counters as the REST stats show them (camelCase keys).
    pub fn snapshot(&self) -> Value {
        let mut out: Map<String, Value> = self
            .counters()
            .into_iter()
            .map(|(key, _, _, c)| (key.to_string(), c.get().into()))
            .collect();
        out.insert("typingDropped".into(), self.typing.get().into());
        Value::Object(out)
    }

    /// The node's metrics in the OpenMetrics text format (which Prometheus reads);
    /// `sessions` and `users` are gauges the caller reads from the registry of sessions.
    pub fn render_prometheus(&self, sessions: usize, users: usize) -> String {
        self.sessions
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
        self.users.set(i64::try_from(users).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            out = format!("# cannot render metrics: {e}\n");
        }
        out
    }
}

/// The content type of [`Metrics::render_prometheus`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_declaration_shows_in_both_the_rest_stats_and_prometheus() {
        let m = Metrics::default();
        m.messages_received.inc_by(3);
        m.typing_dropped();
        m.count_route(Route::Offline);
        m.publish_latency.observe(0.002);
        let stats = m.snapshot();
        assert_eq!(stats["messagesReceived"], 3);
        assert_eq!(stats["typingDropped"], 1);
        assert_eq!(stats.as_object().unwrap().len(), 16);
        let text = m.render_prometheus(2, 1);
        for want in [
            "chatd_websocket_sessions 2",
            "chatd_messages_received_total 3",
            "chatd_frames_dropped_total{kind=\"typing\"} 1",
            "chatd_messages_acked_total{route=\"offline\"} 1",
            "chatd_messages_acked_total{route=\"local\"} 0",
            "chatd_broker_publish_duration_seconds_bucket{le=\"0.0025\"} 1",
            "# HELP chatd_store_failures Sends refused because the store failed.",
        ] {
            assert!(text.contains(want), "no {want:?} in\n{text}");
        }
    }
}
