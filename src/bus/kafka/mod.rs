//! The bus over a Kafka-compatible broker (rdkafka): each node consumes a topic of its own
//! (in generations, see [`topics`]), in a consumer group of its own. The sender's node
//! publishes once per node that holds a target device: targeted, never a broadcast.
//! Offline-push events go to their own topic.
//!
//! Publishing queues the envelope at once (in call order) and the returned future waits for
//! the broker's ack (`acks=all`, up to `kafka.publish_timeout_ms`), so a failure reaches the
//! sender's `MESSAGE_ACK` route and the counters instead of vanishing. The producer lingers
//! `kafka.linger_ms` so that what is queued meanwhile leaves in one request. It is not
//! idempotent: a frame the broker gets twice, or out of order, is dropped or reordered by seq
//! at the device (`chat::order`), while an idempotent producer stays wedged (every publish
//! timing out) after a broker restart that lost its producer state. The consumer stores an
//! offset only after the frame was handed to local delivery.
//!
//! A broker that goes away and comes back without its state (Tansu with in-memory storage
//! does) must not take the node down: librdkafka 2.12 crashes a consumer that asks such a
//! broker for its topic before the topic exists again (a topic with no name in the metadata
//! answer). So when all brokers are down the consumer is destroyed, and a new one is made,
//! on a new generation, once the broker answers. Frames published while the broker was away
//! are not lost to devices: the store has them, and every local device catches up from it
//! once the consumer is back (see `chat::sync`), and again once every sender has moved to
//! the new generation. Senders forget which topic each node consumes when every broker goes
//! away ([`ProducerEvents`]): such a broker acks a produce to a topic it lost, which no one
//! consumes.

mod consume;
pub mod topics;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Bus, BusError, Envelope, Inbound, OfflinePush, Publish};
use crate::config::KafkaConfig;
pub use topics::{topic_state, TopicState};

/// Envelopes consumed but not yet delivered locally; a full queue pauses consumption.
const QUEUE_LEN: usize = 4096;

/// The consumer group of node `node_id`.
pub fn group(config: &KafkaConfig, node_id: &str) -> String {
    format!("{}{node_id}", config.group_prefix)
}

pub struct KafkaBus {
    shared: Arc<Shared>,
    /// The consuming task of this node, stopped by `unsubscribe`.
    consumer: Mutex<Option<JoinHandle<()>>>,
}

/// What publishing needs, also from the futures it returns.
struct Shared {
    config: KafkaConfig,
    producer: FutureProducer<ProducerEvents>,
    /// The topic (newest generation) of every node published to, learned from the broker's
    /// topic list: at every lease tick ([`Bus::warm`]), for a node not known yet, after a
    /// publish to a generation that is gone, and after every broker went away.
    routes: Mutex<Routes>,
    /// How many times every broker went away (counted by [`ProducerEvents`]).
    brokers_lost: Arc<AtomicU64>,
    /// Nodes with topics on the broker but no lease: since when (monotonic, and unix ms to
    /// compare with generations), for [`Bus::sweep`].
    absent: Mutex<HashMap<String, (std::time::Instant, u64)>>,
}

/// The topics to publish to, and in which life of the brokers they were learned.
#[derive(Default)]
struct Routes {
    /// [`Shared::brokers_lost`] when these were learned.
    lost: u64,
    by_node: HashMap<String, String>,
}

impl Routes {
    /// The routes learned since every broker last went away, the `lost`-th time: none if
    /// they went away since these were learned.
    fn since(&mut self, lost: u64) -> &mut HashMap<String, String> {
        if self.lost != lost {
            self.lost = lost;
            self.by_node.clear();
        }
        &mut self.by_node
    }
}

/// The producer's events: counts the times every broker went away. Why: a broker that comes
/// back without its state (Tansu in memory) acks a produce to a topic it no longer has, so a
/// sender that kept publishing to a node's old generation would lose frames into a topic that
/// no one consumes (the node consumes a new one once the broker is back). Its routes are
/// forgotten instead, and the next publish learns the node's topic from the broker again.
struct ProducerEvents {
    lost: Arc<AtomicU64>,
    /// When the warning that every broker went away was last logged: librdkafka reports one
    /// outage more than once (for the bootstrap address and for the broker's id), and an
    /// operator should read one warning per outage.
    warned: Mutex<Option<std::time::Instant>>,
}

/// An outage reported again within this long after its warning is logged at DEBUG only.
const WARN_AGAIN_AFTER: Duration = Duration::from_secs(10);

/// Whether a report at `now` deserves a warning, given the last one (`warned`, updated).
fn warn_now(warned: &mut Option<std::time::Instant>, now: std::time::Instant) -> bool {
    let fresh = warned.is_none_or(|at| now.saturating_duration_since(at) >= WARN_AGAIN_AFTER);
    if fresh {
        *warned = Some(now);
    }
    fresh
}

impl ClientContext for ProducerEvents {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.lost.fetch_add(1, Ordering::SeqCst);
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warn_now(&mut warned, std::time::Instant::now()) {
                tracing::warn!("every Kafka broker is unreachable ({reason}); the topics of other nodes are learned again once one answers");
            } else {
                tracing::debug!("every Kafka broker is unreachable, again ({reason})");
            }
        } else {
            tracing::debug!("librdkafka: {error}: {reason}");
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("kafka {what}: {e}"))
}

/// A client of `config`'s brokers with the operator's `kafka.properties` (TLS, SASL, ...);
/// what each client sets after this is what chatd's guarantees rest on (config validation
/// refuses those names in `kafka.properties`).
pub(crate) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (name, value) in &config.properties {
        c.set(name, value);
    }
    c.set("bootstrap.servers", &config.brokers);
    c
}

fn new_producer(
    config: &KafkaConfig,
    events: ProducerEvents,
) -> Result<FutureProducer<ProducerEvents>, BusError> {
    client_config(config)
        .set("enable.idempotence", "false")
        // Only the node that consumes a topic creates it (two creators raced on a broker
        // that came back empty, and publishes failed for a minute after).
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.refresh.interval.ms", "10000")
        // A topic deleted under a publish (its node restarted) fails the publish within a
        // second, which then goes to the node's new topic; librdkafka's 30 s default would
        // hold it until the publish timed out.
        .set("topic.metadata.propagation.max.ms", "1000")
        .set("acks", "all")
        // Frames queued within this long leave in one request: per-message requests cost the
        // broker ~0.5 ms of CPU each, a batch a few µs per message.
        .set("linger.ms", config.linger_ms.to_string())
        .set("message.timeout.ms", config.publish_timeout_ms.to_string())
        .set("socket.keepalive.enable", "true")
        .create_with_context(events)
        .map_err(|e| unavailable("producer", e))
}

impl KafkaBus {
    pub fn new(config: &KafkaConfig) -> Result<Self, BusError> {
        let brokers_lost = Arc::new(AtomicU64::new(0));
        let events = ProducerEvents {
            lost: brokers_lost.clone(),
            warned: Mutex::new(None),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                producer: new_producer(config, events)?,
                routes: Mutex::default(),
                brokers_lost,
                absent: Mutex::default(),
            }),
            consumer: Mutex::new(None),
        })
    }

    pub fn group(&self, node_id: &str) -> String {
        group(&self.shared.config, node_id)
    }
}

impl Shared {
    /// The topic to publish to of `node_id`, if known since every broker last went away.
    fn route(&self, node_id: &str) -> Option<String> {
        let lost = self.brokers_lost.load(Ordering::SeqCst);
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        routes.since(lost).get(node_id).cloned()
    }

    /// Learns the generation to publish to of each node from the broker's topic list (one
    /// call): the newest that has settled ([`topics::to_publish`]).
    async fn refresh_routes(self: &Arc<Self>, node_ids: &[String]) -> Result<(), BusError> {
        let me = self.clone();
        let wait = Duration::from_millis(self.config.publish_timeout_ms.min(2000));
        let lost = self.brokers_lost.load(Ordering::SeqCst);
        // Listing every topic also gives the producer their metadata, so that the first frame
        // to a node does not wait for it (it waited ~500 ms).
        let names =
            tokio::task::spawn_blocking(move || topics::list_topics(me.producer.client(), wait))
                .await
                .map_err(|e| unavailable("list topics", e))??;
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if self.brokers_lost.load(Ordering::SeqCst) != lost {
            // Listed from a broker that went away meanwhile: what it said may be gone.
            return Err(unavailable(
                "list topics",
                "every broker went away meanwhile",
            ));
        }
        let routes = routes.since(lost);
        let now = crate::chat::ids::now_ms().max(0) as u64;
        for node in node_ids {
            let found = topics::generations(&self.config, node, names.iter().map(String::as_str));
            match topics::to_publish(&found, now, topics::settle_ms(&self.config)).cloned() {
                Some(topic) => {
                    if routes.get(node) != Some(&topic) {
                        tracing::debug!(%node, %topic, "publishing to this topic of the node");
                    }
                    routes.insert(node.clone(), topic);
                }
                None => {
                    routes.remove(node);
                }
            }
        }
        Ok(())
    }

    /// Produces `payload` to `topic` and waits for the broker's ack.
    async fn produce(&self, topic: &str, payload: &[u8]) -> Result<(), KafkaError> {
        let record = FutureRecord::<(), _>::to(topic).payload(payload);
        let wait = Timeout::After(Duration::from_millis(self.config.publish_timeout_ms));
        self.producer
            .send(record, wait)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// The slow path of a publish: the node's topic is not known, or the one used is gone
    /// (the node moved to a new generation, or restarted): learn it again and produce there.
    async fn publish_again(
        self: Arc<Self>,
        node_id: String,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        self.refresh_routes(std::slice::from_ref(&node_id)).await?;
        let Some(topic) = self.route(&node_id) else {
            return Err(BusError::Unavailable(format!(
                "node {node_id:?} has no topic on the broker (not started, or gone)"
            )));
        };
        self.produce(&topic, &payload)
            .await
            .map_err(|e| unavailable(&format!("publish to {topic}"), e))
    }
}

/// Whether a publish failed because its topic does not exist (any more).
fn topic_gone(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
    )
}

#[async_trait]
impl Bus for KafkaBus {
    fn publish(&self, node_id: &str, envelope: Envelope) -> Publish {
        let payload = match serde_json::to_vec(&envelope) {
            Ok(p) => p,
            Err(e) => return Box::pin(std::future::ready(Err(unavailable("encode", e)))),
        };
        let shared = self.shared.clone();
        let node_id = node_id.to_string();
        let Some(topic) = shared.route(&node_id) else {
            return Box::pin(shared.publish_again(node_id, payload));
        };
        // Queued now, in call order; librdkafka batches what is queued within `linger_ms`
        // into one request.
        let record = FutureRecord::<(), _>::to(&topic).payload(&payload);
        let queued = shared.producer.send_result(record).map_err(|(e, _)| e);
        Box::pin(async move {
            let result = match queued {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err((e, _))) => e,
                    Err(_) => {
                        return Err(unavailable(&format!("publish to {topic}"), "producer gone"))
                    }
                },
                Err(e) => e,
            };
            if topic_gone(&result) {
                return shared.publish_again(node_id, payload).await;
            }
            Err(unavailable(&format!("publish to {topic}"), result))
        })
    }

    async fn offline_push(&self, event: OfflinePush) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&event).map_err(|e| unavailable("encode", e))?;
        let topic = &self.shared.config.offline_topic;
        self.shared
            .produce(topic, &payload)
            .await
            .map_err(|e| unavailable(&format!("publish to {topic}"), e))
    }

    async fn subscribe(&self, node_id: &str) -> Result<mpsc::Receiver<Inbound>, BusError> {
        let config = &self.shared.config;
        let consuming = consume::open(config, node_id).await?;
        // A marker through the new generation before the node serves: its consumer is
        // fetching, and the producer knows the topic. Not an envelope; nothing else reads it.
        let marker = format!("chatd-first-fetch {}", consuming.current()).into_bytes();
        let ready = match self.shared.produce(consuming.current(), &marker).await {
            Ok(()) => consuming.first_fetch(&marker, Duration::from_secs(5)).await,
            Err(e) => {
                tracing::debug!("cannot produce the first-fetch marker: {e}");
                false
            }
        };
        if !ready {
            tracing::warn!(topic = %consuming.current(), "this node's consumer did not fetch within 5 s of start; serving anyway");
        }
        tracing::info!(topic = %consuming.current(), group = %self.group(node_id), "consuming a new generation of this node's topic");
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let task = tokio::spawn(consume::run(
            config.clone(),
            node_id.to_string(),
            consuming,
            tx,
        ));
        if let Some(old) = self
            .consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
        Ok(rx)
    }

    /// Stops consuming and deletes every generation of this node's topic: its sessions are
    /// gone, a restarted node starts a new generation, and nobody else reads them.
    async fn unsubscribe(&self, node_id: &str) {
        let task = self
            .consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
            // Its consumers are gone once it is: none of them may see its topic deleted.
            let _ = task.await;
            let config = &self.shared.config;
            let producer = self.shared.producer.clone();
            let wait = Duration::from_secs(2);
            let listed =
                tokio::task::spawn_blocking(move || topics::list_topics(producer.client(), wait))
                    .await;
            if let Ok(Ok(names)) = listed {
                let mine: Vec<String> =
                    topics::generations(config, node_id, names.iter().map(String::as_str))
                        .into_iter()
                        .map(|(_, t)| t)
                        .collect();
                match topics::delete_topics(config, &mine).await {
                    Ok(()) => tracing::info!(topics = ?mine, "deleted this node's topics"),
                    Err(e) => tracing::warn!("cannot delete this node's topics {mine:?}: {e}"),
                }
            }
        }
        // Whatever is still queued goes out before the node exits.
        let producer = self.shared.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            producer.flush(Timeout::After(Duration::from_secs(2)))
        })
        .await;
    }

    async fn health(&self) -> Result<(), BusError> {
        let producer = self.shared.producer.clone();
        let wait = Duration::from_millis(self.shared.config.publish_timeout_ms.min(2000));
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, wait).map(|_| ())
        })
        .await
        .map_err(|e| unavailable("health", e))?
        .map_err(|e| unavailable("metadata", e))
    }

    fn name(&self) -> &'static str {
        "kafka"
    }

    /// Deletes the generations of nodes without a lease for `kafka.abandoned_secs`. Only
    /// generations older than when the node was first seen without a lease: a node that comes
    /// back makes a new one first (before it consumes its older ones), so a node with a
    /// generation newer than that is back, not gone.
    async fn sweep(&self, me: &str, live: &[String]) {
        let shared = self.shared.clone();
        let wait = Duration::from_millis(shared.config.publish_timeout_ms.min(2000));
        let names = match tokio::task::spawn_blocking(move || {
            topics::list_topics(shared.producer.client(), wait)
        })
        .await
        {
            Ok(Ok(names)) => names,
            _ => return,
        };
        let config = &self.shared.config;
        let mut by_node: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        for topic in &names {
            if let Some((node, generation)) = topics::node_generation(config, topic) {
                by_node
                    .entry(node.to_string())
                    .or_default()
                    .push((generation, topic.clone()));
            }
        }
        let now = std::time::Instant::now();
        let now_ms = crate::chat::ids::now_ms().max(0) as u64;
        let abandoned = Duration::from_secs(config.abandoned_secs);
        let mut doomed = Vec::new();
        {
            let mut absent = self.shared.absent.lock().unwrap_or_else(|p| p.into_inner());
            absent.retain(|node, _| by_node.contains_key(node) && !live.contains(node));
            for (node, generations) in &by_node {
                if node == me || live.contains(node) {
                    continue;
                }
                let (since, since_ms) = *absent.entry(node.clone()).or_insert((now, now_ms));
                if generations.iter().any(|(g, _)| *g >= since_ms) {
                    absent.remove(node); // Back: it made a new generation.
                    continue;
                }
                if now.duration_since(since) >= abandoned {
                    doomed.extend(generations.iter().map(|(_, t)| t.clone()));
                    absent.remove(node);
                }
            }
        }
        if doomed.is_empty() {
            return;
        }
        match topics::delete_topics(config, &doomed).await {
            Ok(()) => {
                tracing::info!(topics = ?doomed, "deleted the topics of nodes without a lease for kafka.abandoned_secs")
            }
            Err(e) => tracing::warn!(topics = ?doomed, "cannot delete abandoned topics: {e}"),
        }
    }

    /// Learns the current topic of every live node.
    async fn warm(&self, node_ids: &[String]) {
        if let Err(e) = self.shared.refresh_routes(node_ids).await {
            tracing::debug!("node topics not known yet: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_outage_reported_twice_is_warned_of_once() {
        let mut warned = None;
        let t0 = std::time::Instant::now();
        assert!(warn_now(&mut warned, t0));
        assert!(!warn_now(&mut warned, t0 + Duration::from_millis(3)));
        assert!(!warn_now(&mut warned, t0 + WARN_AGAIN_AFTER / 2));
        // A later outage is warned of again.
        assert!(warn_now(&mut warned, t0 + WARN_AGAIN_AFTER));
        assert!(!warn_now(&mut warned, t0 + WARN_AGAIN_AFTER * 3 / 2));
    }

    #[test]
    fn routes_learned_before_every_broker_went_away_are_forgotten() {
        let mut routes = Routes::default();
        routes.since(0).insert("a".into(), "chat.node.a.g1".into());
        assert_eq!(routes.since(0).get("a").unwrap(), "chat.node.a.g1");
        // Every broker went away: the broker that answers next may not have that topic.
        assert!(routes.since(1).is_empty());
        routes.since(1).insert("a".into(), "chat.node.a.g2".into());
        assert_eq!(routes.since(1).get("a").unwrap(), "chat.node.a.g2");
    }
}
