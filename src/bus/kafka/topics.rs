//! The topics of the Kafka bus. Each node consumes a topic of its own, in generations:
//! `{topic_prefix}{nodeId}.g{generation}`, the generation being the unix milliseconds of its
//! creation. A node makes a new generation when it starts (a node that starts has no
//! sessions: nothing published to its previous life is for anyone here, and every device
//! syncs from the store) and when its current one holds `kafka.rotate_records` records; the
//! previous one is consumed for one more node lease and then deleted. Senders publish to the
//! newest generation the broker lists for a node.
//!
//! Why: consumed records are worth nothing (the store holds every message), and a broker that
//! enforces no retention (Tansu) keeps them, its cost per request growing with them. On a
//! real Kafka, topics are also created with `retention.ms` and `segment.ms`, which it
//! enforces.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::unavailable;
use crate::bus::BusError;
use crate::config::KafkaConfig;

/// A record older than this is never needed (devices catch up from the store): what a real
/// Kafka may delete.
const RETENTION_MS: &str = "600000";
const SEGMENT_MS: &str = "60000";

/// The topic of generation `generation` of node `node_id`.
pub fn generation_topic(config: &KafkaConfig, node_id: &str, generation: u64) -> String {
    format!("{}{node_id}.g{generation}", config.topic_prefix)
}

/// The generation `topic` is of node `node_id`'s topics, if it is one.
pub fn generation_of(config: &KafkaConfig, node_id: &str, topic: &str) -> Option<u64> {
    let rest = topic
        .strip_prefix(&config.topic_prefix)?
        .strip_prefix(node_id)?
        .strip_prefix(".g")?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// The node and generation of any node's generation topic (the last `.g{digits}` ends the
/// node id).
pub fn node_generation<'a>(config: &KafkaConfig, topic: &'a str) -> Option<(&'a str, u64)> {
    let (node, generation) = topic
        .strip_prefix(&config.topic_prefix)?
        .rsplit_once(".g")?;
    if node.is_empty() || generation.is_empty() || !generation.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((node, generation.parse().ok()?))
}

/// Node `node_id`'s generations among `topics`, oldest first.
pub fn generations<'a>(
    config: &KafkaConfig,
    node_id: &str,
    topics: impl IntoIterator<Item = &'a str>,
) -> Vec<(u64, String)> {
    let mut found: Vec<(u64, String)> = topics
        .into_iter()
        .filter_map(|t| generation_of(config, node_id, t).map(|g| (g, t.to_string())))
        .collect();
    found.sort();
    found
}

/// How old a generation must be (by the sender's clock; generations are named by their unix
/// ms) before senders move to it: 2 s, or a sixth of `kafka.drain_secs` if that is less. Its
/// consumer needs a few hundred milliseconds before its first fetch (metadata, then a fetch),
/// and its node still consumes the one before it fast for half the drain: frames sent
/// meanwhile would wait for the new consumer.
pub fn settle_ms(config: &KafkaConfig) -> u64 {
    (config.drain_secs * 1000 / 6).min(2_000)
}

/// The generation a sender publishes to, among a node's generations (oldest first): the
/// newest at least `settle_ms` old, else the newest (a node that just started has only a
/// new one, or an older one from its previous life that it consumes from its end).
pub fn to_publish(found: &[(u64, String)], now_ms: u64, settle_ms: u64) -> Option<&String> {
    found
        .iter()
        .rev()
        .find(|(g, _)| g.saturating_add(settle_ms) <= now_ms)
        .or(found.last())
        .map(|(_, topic)| topic)
}

/// Every topic the broker lists. Blocking.
pub fn list_topics<C: ClientContext>(
    client: &Client<C>,
    wait: Duration,
) -> Result<Vec<String>, BusError> {
    let metadata = client
        .fetch_metadata(None, wait)
        .map_err(|e| unavailable("list topics", e))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_string())
        .collect())
}

fn admin(
    config: &KafkaConfig,
) -> Result<(AdminClient<DefaultClientContext>, AdminOptions), BusError> {
    let admin = super::client_config(config)
        .create()
        .map_err(|e| unavailable("admin", e))?;
    let wait = Duration::from_millis(config.publish_timeout_ms);
    let options = AdminOptions::new()
        .operation_timeout(Some(wait))
        .request_timeout(Some(wait));
    Ok((admin, options))
}

/// Creates the topics if missing, with the retention a real Kafka enforces; returns those
/// created now (empty ones).
pub async fn ensure_topics(
    config: &KafkaConfig,
    topics: &[String],
) -> Result<Vec<String>, BusError> {
    let (admin, options) = admin(config)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(t, 1, TopicReplication::Fixed(1))
                .set("retention.ms", RETENTION_MS)
                .set("segment.ms", SEGMENT_MS)
        })
        .collect();
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

/// Deletes the topics; one already gone is not an error.
pub async fn delete_topics(config: &KafkaConfig, topics: &[String]) -> Result<(), BusError> {
    if topics.is_empty() {
        return Ok(());
    }
    let (admin, options) = admin(config)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    for result in admin
        .delete_topics(&names, &options)
        .await
        .map_err(|e| unavailable("delete topics", e))?
    {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(unavailable(&format!("delete topic {topic}"), code)),
        }
    }
    Ok(())
}

/// A node's current topic as `chatd stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicState {
    pub topic: String,
    /// Records in it (its high watermark; Tansu has been seen to count batches).
    pub records: i64,
    /// Where the node's consumer group has committed, if it has.
    pub committed: Option<i64>,
}

/// Node `node_id`'s newest topic, its size and how far its consumer is. Blocking; call from
/// `spawn_blocking`.
pub fn topic_state(config: &KafkaConfig, node_id: &str) -> Result<TopicState, BusError> {
    let consumer: BaseConsumer = super::client_config(config)
        .set("group.id", super::group(config, node_id))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| unavailable("consumer", e))?;
    let wait = Duration::from_secs(3);
    let names = list_topics(consumer.client(), wait)?;
    let Some((_, topic)) = generations(config, node_id, names.iter().map(String::as_str)).pop()
    else {
        return Err(BusError::Unavailable(format!(
            "no topic {}{node_id}.g* on the broker",
            config.topic_prefix
        )));
    };
    let (_, records) = consumer
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
    Ok(TopicState {
        topic,
        records,
        committed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_are_told_apart_from_other_nodes_topics() {
        let c = KafkaConfig::default();
        assert_eq!(generation_topic(&c, "a", 17), "chat.node.a.g17");
        assert_eq!(generation_of(&c, "a", "chat.node.a.g17"), Some(17));
        // Node "a.g1" is another node, and "a" has no generation "1.g5".
        assert_eq!(generation_of(&c, "a", "chat.node.a.g1.g5"), None);
        assert_eq!(generation_of(&c, "a.g1", "chat.node.a.g1.g5"), Some(5));
        assert_eq!(generation_of(&c, "a", "chat.node.a"), None);
        assert_eq!(generation_of(&c, "a", "chat.node.ab.g3"), None);
        assert_eq!(generation_of(&c, "a", "chat.node.a.g"), None);
        let found = generations(
            &c,
            "a",
            [
                "chat.node.a.g9",
                "chat.node.b.g1",
                "chat.node.a.g10",
                "chat.offline-push",
            ],
        );
        assert_eq!(
            found,
            vec![
                (9, "chat.node.a.g9".to_string()),
                (10, "chat.node.a.g10".to_string())
            ]
        );
    }

    #[test]
    fn any_nodes_generation_is_read_from_its_topic() {
        let c = KafkaConfig::default();
        assert_eq!(node_generation(&c, "chat.node.a.g17"), Some(("a", 17)));
        assert_eq!(node_generation(&c, "chat.node.a.g1.g5"), Some(("a.g1", 5)));
        assert_eq!(node_generation(&c, "chat.node.a"), None);
        assert_eq!(node_generation(&c, "chat.node..g5"), None);
        assert_eq!(node_generation(&c, "chat.offline-push"), None);
    }

    #[test]
    fn senders_move_to_a_generation_once_it_has_settled() {
        let found = vec![(1_000, "old".to_string()), (10_000, "new".to_string())];
        let settle = settle_ms(&KafkaConfig::default());
        assert_eq!(settle, 2_000);
        assert_eq!(to_publish(&found, 11_000, settle).unwrap(), "old");
        assert_eq!(to_publish(&found, 12_000, settle).unwrap(), "new");
        // A node's only generation, however new.
        assert_eq!(to_publish(&found[1..], 10_001, settle).unwrap(), "new");
        assert_eq!(to_publish(&[], 10_001, settle), None);
        // A short drain: a sixth of it.
        let short = KafkaConfig {
            drain_secs: 3,
            ..KafkaConfig::default()
        };
        assert_eq!(settle_ms(&short), 500);
    }
}
