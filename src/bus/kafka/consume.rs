//! This node's consumer: a new generation of its topic at start (see `topics`), consumed from
//! its beginning; a newer generation once the current one is large, the old one consumed for
//! `kafka.drain_secs` more (senders learn of the new one within a lease tick) and then
//! deleted; and a new consumer whenever all brokers went away (see
//! the module's note in `kafka`).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::topics::{self, delete_topics, ensure_topics, generation_topic, list_topics};
use super::{group, unavailable};
use crate::bus::{BusError, Envelope, Inbound};
use crate::chat::ids::now_ms;
use crate::config::KafkaConfig;

/// How often the consumer looks at its topic's size and at retired generations.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A generation that is no longer current, consumed until `delete_at`, then deleted.
struct Retired {
    topic: String,
    delete_at: Instant,
}

/// A consumer and the generations it knows of.
pub struct Consuming {
    consumer: Arc<StreamConsumer>,
    current: String,
    retired: Vec<Retired>,
}

impl Consuming {
    pub fn current(&self) -> &str {
        &self.current
    }
}

fn new_consumer(config: &KafkaConfig, node_id: &str) -> Result<StreamConsumer, BusError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group(config, node_id))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
        .set("socket.keepalive.enable", "true")
        .create()
        .map_err(|e| unavailable("consumer", e))
}

/// Adds `topic` to the consumer's assignment at `from`, or (`None`) removes it.
async fn assign(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    from: Option<Offset>,
) -> Result<(), BusError> {
    let (consumer, topic) = (consumer.clone(), topic.to_string());
    let add = from.is_some();
    tokio::task::spawn_blocking(move || {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, 0, from.unwrap_or(Offset::Invalid))
            .map_err(|e| unavailable("assign", e))?;
        // One partition per topic, one consumer: assigned directly, so there is no group
        // rebalance to wait for before frames flow.
        let done = if add {
            consumer.incremental_assign(&list)
        } else {
            consumer.incremental_unassign(&list)
        };
        done.map_err(|e| unavailable(&format!("assign {topic}"), e))
    })
    .await
    .map_err(|e| unavailable("assign", e))?
}

/// Opens this node's consumer on a new generation of its topic, taken before the node serves
/// anyone. A node that starts has no sessions, so what was published to its older
/// generations is for nobody here: they are consumed from their end as it is now (a sender
/// that has not learnt of the new generation yet still publishes there, for devices that are
/// here by then), and deleted after `kafka.drain_secs`.
pub async fn open(config: &KafkaConfig, node_id: &str) -> Result<Consuming, BusError> {
    let consumer = Arc::new(new_consumer(config, node_id)?);
    let lister = consumer.clone();
    let wait = Duration::from_millis(config.publish_timeout_ms);
    let existing = tokio::task::spawn_blocking(move || list_topics(lister.client(), wait))
        .await
        .map_err(|e| unavailable("list topics", e))??;
    let older = topics::generations(config, node_id, existing.iter().map(String::as_str));
    let newest = older.last().map_or(0, |(g, _)| g + 1);
    let current = generation_topic(config, node_id, (now_ms().max(0) as u64).max(newest));
    ensure_topics(config, &[current.clone(), config.offline_topic.clone()]).await?;
    assign(&consumer, &current, Some(Offset::Beginning)).await?;
    let mut retired = Vec::new();
    for (_, topic) in older {
        // The end taken now, before the node serves: nothing published after it is skipped.
        let (c, t) = (consumer.clone(), topic.clone());
        let end = tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, 0, wait))
            .await
            .map_err(|e| unavailable("watermarks", e))?;
        let from = match end {
            Ok((_, high)) => Offset::Offset(high),
            Err(e) => {
                tracing::warn!(%topic, "end of an old generation unknown ({e}); reading it all");
                Offset::Beginning
            }
        };
        assign(&consumer, &topic, Some(from)).await?;
        retired.push(Retired {
            topic,
            delete_at: Instant::now() + Duration::from_secs(config.drain_secs),
        });
    }
    Ok(Consuming {
        consumer,
        current,
        retired,
    })
}

/// Consumes this node's topics into `tx` until the node stops consuming.
pub async fn run(
    config: KafkaConfig,
    node_id: String,
    mut c: Consuming,
    tx: mpsc::Sender<Inbound>,
) {
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            r = c.consumer.recv() => r,
            _ = check.tick() => {
                upkeep(&config, &node_id, &mut c).await;
                continue;
            }
        };
        let message = match received {
            Ok(m) => m,
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)) => {
                tracing::warn!(
                    "the Kafka broker is gone; this node's consumer waits for it to come back"
                );
                // Destroyed before the broker returns: see the module's note.
                let consumer = c.consumer;
                let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
                c = reopen(&config, &node_id).await;
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
        if let Err(e) = c.consumer.store_offset_from_message(&message) {
            tracing::warn!("cannot store offset {}: {e}", message.offset());
        }
    }
}

/// Deletes retired generations whose time is up, and starts a new generation when the
/// current one holds `kafka.rotate_records` records.
async fn upkeep(config: &KafkaConfig, node_id: &str, c: &mut Consuming) {
    let now = Instant::now();
    let (due, kept): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut c.retired)
        .into_iter()
        .partition(|r| r.delete_at <= now);
    c.retired = kept;
    for r in due {
        if let Err(e) = assign(&c.consumer, &r.topic, None).await {
            tracing::warn!(topic = %r.topic, "cannot stop consuming a retired topic: {e}");
        }
        match delete_topics(config, std::slice::from_ref(&r.topic)).await {
            Ok(()) => tracing::info!(topic = %r.topic, "deleted a retired topic of this node"),
            Err(e) => tracing::warn!(topic = %r.topic, "cannot delete a retired topic: {e}"),
        }
    }
    if !c.retired.is_empty() {
        return; // One rotation at a time.
    }
    let (consumer, topic) = (c.consumer.clone(), c.current.clone());
    let size = tokio::task::spawn_blocking(move || {
        consumer.fetch_watermarks(&topic, 0, Duration::from_secs(3))
    })
    .await;
    let records = match size {
        Ok(Ok((_, high))) => high,
        _ => return,
    };
    if records < config.rotate_records as i64 {
        return;
    }
    let newest = topics::generation_of(config, node_id, &c.current).unwrap_or(0) + 1;
    let next = generation_topic(config, node_id, (now_ms().max(0) as u64).max(newest));
    let started = async {
        ensure_topics(config, std::slice::from_ref(&next)).await?;
        assign(&c.consumer, &next, Some(Offset::Beginning)).await
    };
    match started.await {
        Ok(()) => {
            tracing::info!(old = %c.current, new = %next, records, "this node's topic is large: moved to a new generation");
            let old = std::mem::replace(&mut c.current, next);
            c.retired.push(Retired {
                topic: old,
                delete_at: Instant::now() + Duration::from_secs(config.drain_secs),
            });
        }
        Err(e) => tracing::warn!("cannot start a new generation of this node's topic: {e}"),
    }
}

/// A new consumer once the broker answers again, trying every second.
async fn reopen(config: &KafkaConfig, node_id: &str) -> Consuming {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match open(config, node_id).await {
            Ok(c) => {
                tracing::info!(topic = %c.current, "the Kafka broker is back; consuming a new generation of this node's topic");
                return c;
            }
            Err(e) => tracing::debug!("the Kafka broker is not back yet: {e}"),
        }
    }
}
