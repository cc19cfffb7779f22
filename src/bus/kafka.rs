//! The bus over a Kafka-compatible broker (rdkafka): one topic per node (`{topic_prefix}{nodeId}`,
//! created at start-up), each node consuming only its own, in a consumer group of its own.
//! The sender's node publishes once per node that holds a target device: targeted, never a
//! broadcast. Offline-push events go to their own topic.
//!
//! The producer publishes with `acks=all` and waits for the broker's ack (up to
//! `kafka.publish_timeout_ms`), so a failure reaches the sender's `MESSAGE_ACK` route and the
//! counters instead of vanishing. It is not idempotent: a frame the broker gets twice, or out
//! of order, is dropped or reordered by seq at the device (`chat::order`), while an idempotent
//! producer stays wedged (every publish timing out) after a broker restart that lost its
//! producer state. The consumer stores an offset only after the frame was handed to local
//! delivery.
//!
//! A broker that goes away and comes back without its state (Tansu with in-memory storage
//! does) must not take the node down: librdkafka 2.12 crashes a consumer that asks such a
//! broker for its topic before the topic exists again (a topic with no name in the metadata
//! answer). So when all brokers are down the consumer is destroyed, and a new one is made
//! once the broker answers and this node's topic exists again. Frames published while the
//! broker was away are not lost to devices: the store has them, and every local device
//! catches up from it once the consumer is back (see `chat::sync`).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Bus, BusError, Envelope, Inbound, OfflinePush, Publish};
use crate::config::KafkaConfig;

/// Envelopes consumed but not yet delivered locally; a full queue pauses consumption.
const QUEUE_LEN: usize = 4096;

/// The topic node `node_id` consumes.
pub fn node_topic(config: &KafkaConfig, node_id: &str) -> String {
    format!("{}{node_id}", config.topic_prefix)
}

/// The consumer group of node `node_id`.
pub fn group(config: &KafkaConfig, node_id: &str) -> String {
    format!("{}{node_id}", config.group_prefix)
}

pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    /// Node topics whose metadata the producer has (see [`Bus::warm`]).
    warmed: Mutex<std::collections::HashSet<String>>,
    /// The consuming task of this node, stopped by `unsubscribe`.
    consumer: Mutex<Option<JoinHandle<()>>>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("kafka {what}: {e}"))
}

fn new_producer(config: &KafkaConfig) -> Result<FutureProducer, BusError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("enable.idempotence", "false")
        // Only the node that consumes a topic creates it (two creators raced on a broker
        // that came back empty, and publishes failed for a minute after).
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("acks", "all")
        // Frames queued within this long leave in one request: per-message requests cost the
        // broker ~0.5 ms of CPU each, a batch a few µs per message.
        .set("linger.ms", config.linger_ms.to_string())
        .set("message.timeout.ms", config.publish_timeout_ms.to_string())
        .set("socket.keepalive.enable", "true")
        .create()
        .map_err(|e| unavailable("producer", e))
}

impl KafkaBus {
    pub fn new(config: &KafkaConfig) -> Result<Self, BusError> {
        Ok(Self {
            config: config.clone(),
            producer: new_producer(config)?,
            warmed: Mutex::default(),
            consumer: Mutex::new(None),
        })
    }

    pub fn node_topic(&self, node_id: &str) -> String {
        node_topic(&self.config, node_id)
    }

    pub fn group(&self, node_id: &str) -> String {
        group(&self.config, node_id)
    }
}

/// Creates the topics if missing; returns those that were created now (empty ones).
async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<Vec<String>, BusError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .map_err(|e| unavailable("admin", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_millis(config.publish_timeout_ms)))
        .request_timeout(Some(Duration::from_millis(config.publish_timeout_ms)));
    let mut created = Vec::new();
    for result in admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| unavailable("create topics", e))?
    {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(unavailable(&format!("create topic {topic}"), code)),
        }
    }
    Ok(created)
}

impl KafkaBus {
    /// Where this node starts reading its topic. A topic made just now starts at its
    /// beginning; an older one where the group left off (a restarted node picks up what was
    /// routed to it meanwhile), else at its end, or at its beginning when `resuming` after
    /// the broker came back (the topic was made again, perhaps by a publisher before this
    /// node: what was published since is for devices here now; what they had is dropped by
    /// seq). Deciding this before the node accepts connections means nothing routed to it
    /// can be skipped: no device is here before.
    fn start_offset(
        consumer: &StreamConsumer,
        topic: &str,
        fresh: bool,
        resuming: bool,
    ) -> Result<Offset, BusError> {
        if fresh {
            return Ok(Offset::Beginning);
        }
        let mut wanted = TopicPartitionList::new();
        wanted.add_partition(topic, 0);
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(5))
            .map_err(|e| unavailable(&format!("committed offset of {topic}"), e))?;
        Ok(
            match committed.find_partition(topic, 0).map(|p| p.offset()) {
                Some(Offset::Offset(n)) => Offset::Offset(n),
                _ if resuming => Offset::Beginning,
                _ => Offset::End,
            },
        )
    }

    async fn produce(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), BusError> {
        let record = FutureRecord::to(topic).key(key).payload(payload);
        let wait = Timeout::After(Duration::from_millis(self.config.publish_timeout_ms));
        self.producer
            .send(record, wait)
            .await
            .map(|_| ())
            .map_err(|(e, _)| unavailable(&format!("publish to {topic}"), e))
    }
}

/// Makes this node's consumer: its topic exists (created if missing), the partition assigned
/// at the start offset [`KafkaBus::start_offset`] decides.
async fn open_consumer(
    config: &KafkaConfig,
    node_id: &str,
    resuming: bool,
) -> Result<(StreamConsumer, Offset), BusError> {
    let topic = node_topic(config, node_id);
    let created = ensure_topics(config, &[topic.clone(), config.offline_topic.clone()]).await?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group(config, node_id))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
        .set("socket.keepalive.enable", "true")
        .create()
        .map_err(|e| unavailable("consumer", e))?;
    // One partition, one consumer: assigned directly, so there is no group rebalance to
    // wait for before frames flow (a subscribe would join the group first, and frames
    // published meanwhile could be skipped).
    let fresh = created.contains(&topic);
    tokio::task::spawn_blocking(move || {
        let offset = KafkaBus::start_offset(&consumer, &topic, fresh, resuming)?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, offset)
            .map_err(|e| unavailable("assign", e))?;
        consumer
            .assign(&assignment)
            .map_err(|e| unavailable(&format!("assign {topic}"), e))?;
        Ok::<_, BusError>((consumer, offset))
    })
    .await
    .map_err(|e| unavailable("assign", e))?
}

/// Consumes this node's topic into `tx` until the node stops consuming; makes a new consumer
/// whenever all brokers went away (see the module's note).
async fn consume(
    config: KafkaConfig,
    node_id: String,
    mut consumer: StreamConsumer,
    tx: mpsc::Sender<Inbound>,
) {
    loop {
        let message = match consumer.recv().await {
            Ok(m) => m,
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)) => {
                tracing::warn!(
                    "the Kafka broker is gone; this node's consumer waits for it to come back"
                );
                // Destroyed before the broker returns: see the module's note.
                let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
                consumer = reopen(&config, &node_id).await;
                if tx.send(Inbound::Resumed).await.is_err() {
                    return;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("kafka receive failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match message.payload().map(serde_json::from_slice::<Envelope>) {
            Some(Ok(envelope)) => {
                tracing::debug!(from = %envelope.from_node, "received a frame from the broker");
                if tx.send(Inbound::Envelope(envelope)).await.is_err() {
                    return;
                }
            }
            Some(Err(e)) => tracing::error!(
                offset = message.offset(),
                "skipping an unreadable envelope: {e}"
            ),
            None => {
                tracing::error!(offset = message.offset(), "skipping an empty envelope")
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&message) {
            tracing::warn!("cannot store offset {}: {e}", message.offset());
        }
    }
}

/// A new consumer once the broker answers again, trying every second.
async fn reopen(config: &KafkaConfig, node_id: &str) -> StreamConsumer {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match open_consumer(config, node_id, true).await {
            Ok((consumer, offset)) => {
                tracing::info!(start = ?offset, "the Kafka broker is back; consuming this node's topic again");
                return consumer;
            }
            Err(e) => tracing::debug!("the Kafka broker is not back yet: {e}"),
        }
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn publish(&self, node_id: &str, envelope: Envelope) -> Publish {
        let failed = |e: BusError| -> Publish { Box::pin(std::future::ready(Err(e))) };
        let payload = match serde_json::to_vec(&envelope) {
            Ok(p) => p,
            Err(e) => return failed(unavailable("encode", e)),
        };
        let topic = self.node_topic(node_id);
        let record = FutureRecord::<(), _>::to(&topic).payload(&payload);
        // Queued now, in call order; librdkafka batches what is queued within `linger_ms`
        // into one request.
        match self.producer.send_result(record) {
            Ok(delivery) => Box::pin(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(unavailable(&format!("publish to {topic}"), e)),
                    Err(_) => Err(unavailable(&format!("publish to {topic}"), "producer gone")),
                }
            }),
            Err((e, _)) => failed(unavailable(&format!("publish to {topic}"), e)),
        }
    }

    async fn offline_push(&self, event: OfflinePush) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&event).map_err(|e| unavailable("encode", e))?;
        self.produce(&self.config.offline_topic, &event.user_id, &payload)
            .await
    }

    async fn subscribe(&self, node_id: &str) -> Result<mpsc::Receiver<Inbound>, BusError> {
        let (consumer, offset) = open_consumer(&self.config, node_id, false).await?;
        tracing::info!(topic = %self.node_topic(node_id), group = %self.group(node_id), start = ?offset, "consuming this node's topic");
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let task = tokio::spawn(consume(
            self.config.clone(),
            node_id.to_string(),
            consumer,
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

    async fn unsubscribe(&self, _node_id: &str) {
        if let Some(task) = self
            .consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        // Whatever is still queued goes out before the node exits.
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            producer.flush(Timeout::After(Duration::from_secs(2)))
        })
        .await;
    }

    async fn health(&self) -> Result<(), BusError> {
        let producer = self.producer.clone();
        let wait = Duration::from_millis(self.config.publish_timeout_ms.min(2000));
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

    /// Asks the broker for the metadata of every new node's topic: without it the first
    /// frame to a node waited about half a second for librdkafka to look the topic up.
    async fn warm(&self, node_ids: &[String]) {
        let topics: Vec<String> = {
            let warmed = self.warmed.lock().unwrap_or_else(|p| p.into_inner());
            node_ids
                .iter()
                .map(|n| self.node_topic(n))
                .filter(|t| !warmed.contains(t))
                .collect()
        };
        for topic in topics {
            let producer = self.producer.clone();
            let t = topic.clone();
            let wait = Duration::from_millis(self.config.publish_timeout_ms.min(2000));
            let known = tokio::task::spawn_blocking(move || {
                producer.client().fetch_metadata(Some(&t), wait)
            })
            .await;
            match known {
                Ok(Ok(_)) => {
                    tracing::debug!(%topic, "producer knows the topic");
                    self.warmed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(topic);
                }
                Ok(Err(e)) => tracing::debug!(%topic, "topic metadata not known yet: {e}"),
                Err(e) => tracing::debug!(%topic, "topic metadata not known yet: {e}"),
            }
        }
    }
}

/// How far node `node_id`'s consumer group is behind on its topic: (high watermark, committed
/// offset). Blocking; call from `spawn_blocking`. Tansu has been seen to report a high
/// watermark that counts batches rather than records, so treat the difference as a hint.
pub fn topic_lag(config: &KafkaConfig, node_id: &str) -> Result<(i64, Option<i64>), BusError> {
    use rdkafka::consumer::BaseConsumer;
    let topic = node_topic(config, node_id);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group(config, node_id))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| unavailable("consumer", e))?;
    let wait = Duration::from_secs(3);
    let (_, high) = consumer
        .fetch_watermarks(&topic, 0, wait)
        .map_err(|e| unavailable(&format!("watermarks of {topic}"), e))?;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(&topic, 0);
    let committed = consumer
        .committed_offsets(wanted, wait)
        .map_err(|e| unavailable(&format!("committed offset of {topic}"), e))?;
    let committed = match committed.find_partition(&topic, 0).map(|p| p.offset()) {
        Some(Offset::Offset(n)) => Some(n),
        _ => None,
    };
    Ok((high, committed))
}
