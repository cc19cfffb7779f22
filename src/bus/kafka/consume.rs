//! This node's consumers: one per generation of its topic (see `topics`). A new generation at
//! start, consumed from its beginning; a newer one once the current one is large, the old one
//! consumed `kafka.drain_secs` more (senders learn of the new one within a lease tick) and then
//! deleted; and new consumers whenever all brokers went away (see the module's note in
//! `kafka`). A retired generation is fetched as fast as the current one for the first half
//! of its drain, then slowly (a consumer costs the broker a fetch every `kafka.fetch_wait_ms`,
//! frames or not); a new rotation waits until no retired generation is fetched fast.
//!
//! Each generation has a consumer of its own, destroyed before its topic is deleted: a
//! librdkafka consumer must never look for a topic that is gone (librdkafka 2.12 has crashed
//! on the answer Tansu gives for a topic it does not know).

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::topics::{self, delete_topics, ensure_topics, generation_topic, list_topics};
use super::{group, unavailable};
use crate::bus::{BusError, Envelope, Inbound};
use crate::chat::ids::now_ms;
use crate::config::KafkaConfig;

/// How often the consumer looks at its topic's size and at retired generations.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a consumer may hand on nothing while the broker holds records past its position
/// before it is replaced (see [`watch`]).
const STALLED_AFTER: Duration = Duration::from_secs(3);
/// The fetch wait of a retired generation once senders have moved on: a fetch costs the
/// broker as much empty as full, and few frames still come there.
const SLOW_FETCH_WAIT_MS: u64 = 500;

/// One generation being consumed.
struct Generation {
    topic: String,
    consumer: Arc<StreamConsumer>,
    /// Where its consumer started: where a new consumer starts if the old one got nothing.
    from: Offset,
    /// A retired generation: when it is consumed slowly (its senders have moved on), and when
    /// it is let go and deleted. `None` for the current one.
    retired: Option<Retired>,
    /// The position its consumer had, and since when, while the broker held records past it:
    /// see [`watch`].
    behind: Option<(i64, Instant)>,
}

#[derive(Clone, Copy)]
struct Retired {
    /// Until then it is fetched as fast as the current one; after, every
    /// [`SLOW_FETCH_WAIT_MS`].
    slow_at: Instant,
    /// When its consumer is destroyed and its topic deleted.
    delete_at: Instant,
    /// Its consumer fetches slowly already.
    slow: bool,
}

impl Retired {
    /// Retired now: fast for half of `kafka.drain_secs` (more than a lease tick plus the new
    /// generation's settling time, within which every sender moves to it), deleted after
    /// all of it.
    fn now(config: &KafkaConfig) -> Self {
        let now = Instant::now();
        Self {
            slow_at: now + Duration::from_secs(config.drain_secs) / 2,
            delete_at: now + Duration::from_secs(config.drain_secs),
            slow: false,
        }
    }
}

/// This node's generations: the current one last.
pub struct Consuming {
    generations: Vec<Generation>,
    /// A client with no group and no assignment that asks the broker for the current
    /// generation's size, on a connection of its own (a stuck consumer's connection could not
    /// tell it is stuck). Replaced with the generation, so it never asks about a topic that
    /// is deleted later: see the module's note.
    sizer: Arc<BaseConsumer>,
}

/// A look at the current generation under way in a task of its own (see [`upkeep`]).
type Checking = Option<tokio::sync::oneshot::Receiver<Checked>>;

/// What a look at the current generation found.
struct Checked {
    topic: String,
    /// How many records the broker holds in it (its high watermark), if it answered.
    end: Option<i64>,
    /// A new generation, made because this one is large.
    next: Option<NewGeneration>,
}

/// A new generation being adopted.
struct NewGeneration {
    topic: String,
    consumer: Arc<StreamConsumer>,
    /// Asks for its size (see [`Consuming::sizer`]).
    sizer: Arc<BaseConsumer>,
    /// How many records the generation before it held.
    records: i64,
}

impl Consuming {
    pub fn current(&self) -> &str {
        self.generations.last().map_or("", |g| g.topic.as_str())
    }

    /// Waits (at most `within`) until the current generation's consumer hands on `marker`,
    /// a record just produced to it, and steps past it: a new consumer needs a few hundred
    /// milliseconds to its first fetch, and a node that serves before that made the first
    /// frames sent to it wait (the first cross-node message took ~0.5 s). Returns whether it
    /// came.
    pub async fn first_fetch(&self, marker: &[u8], within: Duration) -> bool {
        let Some(g) = self.generations.last() else {
            return false;
        };
        let wait = async {
            loop {
                match g.consumer.recv().await {
                    Ok(m) if m.payload() == Some(marker) => {
                        let _ = g.consumer.store_offset_from_message(&m);
                        return true;
                    }
                    // Nothing else can be there yet: the topic is new.
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("waiting for the first fetch: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        };
        tokio::time::timeout(within, wait).await.unwrap_or(false)
    }
}

/// A consumer of `topic` alone, from `from`. One partition per topic, one consumer: assigned
/// directly, so there is no group rebalance to wait for before frames flow.
async fn consumer_of(
    config: &KafkaConfig,
    node_id: &str,
    topic: &str,
    from: Offset,
    fetch_wait_ms: u64,
) -> Result<Arc<StreamConsumer>, BusError> {
    let consumer: StreamConsumer = super::client_config(config)
        .set("group.id", group(config, node_id))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("socket.keepalive.enable", "true")
        .create()
        .map_err(|e| unavailable("consumer", e))?;
    let consumer = Arc::new(consumer);
    let (c, t) = (consumer.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&t, 0, from)
            .map_err(|e| unavailable("assign", e))?;
        c.assign(&list)
            .map_err(|e| unavailable(&format!("assign {t}"), e))
    })
    .await
    .map_err(|e| unavailable("assign", e))??;
    Ok(consumer)
}

/// A client with no group and no assignment, only to ask the broker about topics.
fn plain_client(config: &KafkaConfig) -> Result<Arc<BaseConsumer>, BusError> {
    super::client_config(config)
        .create()
        .map(Arc::new)
        .map_err(|e| unavailable("consumer", e))
}

/// Destroys a client off the runtime (it waits for librdkafka's threads).
async fn destroy<T: Send + Sync + 'static>(consumer: Arc<T>) {
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
}

/// Opens this node's consumer on a new generation of its topic, taken before the node serves
/// anyone. A node that starts has no sessions, so what was published to its older
/// generations is for nobody here: they are consumed from their end as it is now (a sender
/// that has not learnt of the new generation yet still publishes there, for devices that are
/// here by then), and deleted after `kafka.drain_secs`.
pub async fn open(config: &KafkaConfig, node_id: &str) -> Result<Consuming, BusError> {
    let wait = Duration::from_millis(config.publish_timeout_ms);
    // A client with no group and no assignment, only to look at topics.
    let lister = plain_client(config)?;
    let l = lister.clone();
    let existing = tokio::task::spawn_blocking(move || list_topics(l.client(), wait))
        .await
        .map_err(|e| unavailable("list topics", e))??;
    let older = topics::generations(config, node_id, existing.iter().map(String::as_str));
    let newest = older.last().map_or(0, |(g, _)| g + 1);
    let current = generation_topic(config, node_id, (now_ms().max(0) as u64).max(newest));
    ensure_topics(config, &[current.clone(), config.offline_topic.clone()]).await?;

    let mut generations = Vec::new();
    for (_, topic) in older {
        // The end taken now, before the node serves: nothing published after it is skipped.
        let (l, t) = (lister.clone(), topic.clone());
        let end = tokio::task::spawn_blocking(move || l.fetch_watermarks(&t, 0, wait))
            .await
            .map_err(|e| unavailable("watermarks", e))?;
        let from = match end {
            Ok((_, high)) => Offset::Offset(high),
            Err(e) => {
                tracing::warn!(%topic, "end of an old generation unknown ({e}); reading it all");
                Offset::Beginning
            }
        };
        generations.push(Generation {
            consumer: consumer_of(config, node_id, &topic, from, config.fetch_wait_ms).await?,
            topic,
            from,
            retired: Some(Retired::now(config)),
            behind: None,
        });
    }
    generations.push(Generation {
        consumer: consumer_of(
            config,
            node_id,
            &current,
            Offset::Beginning,
            config.fetch_wait_ms,
        )
        .await?,
        topic: current,
        from: Offset::Beginning,
        retired: None,
        behind: None,
    });
    destroy(lister).await;
    Ok(Consuming {
        generations,
        sizer: plain_client(config)?,
    })
}

/// The next message of any generation, with the index of its generation.
async fn next_message(
    generations: &[Generation],
) -> (usize, Result<BorrowedMessage<'_>, KafkaError>) {
    let receiving = generations
        .iter()
        .map(|g| g.consumer.recv().boxed())
        .collect::<Vec<_>>();
    let (result, i, _) = futures_util::future::select_all(receiving).await;
    (i, result)
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
    let mut checking: Checking = None;
    // Once the broker is back, when local devices catch up a second time (see below).
    let mut again: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let gone = tokio::select! {
            (i, received) = next_message(&c.generations) => {
                match received {
                    Ok(message) => {
                        if !deliver(&message, &tx).await {
                            return;
                        }
                        if let Err(e) = c.generations[i].consumer.store_offset_from_message(&message) {
                            tracing::warn!("cannot store offset {}: {e}", message.offset());
                        }
                        false
                    }
                    Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)) => true,
                    Err(e) => {
                        tracing::warn!("kafka receive failed: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        false
                    }
                }
            }
            _ = check.tick() => {
                upkeep(&config, &node_id, &mut c, &mut checking).await;
                false
            }
            () = async { again.as_mut().expect("guarded").await }, if again.is_some() => {
                again = None;
                tracing::info!("every sender has moved to this node's new generation by now: local devices catch up once more");
                if tx.send(Inbound::Resumed).await.is_err() {
                    return;
                }
                false
            }
            checked = looked(&mut checking) => {
                checking = None;
                if let Some(checked) = checked {
                    if watch(&config, &node_id, &mut c, &checked).await && tx.send(Inbound::ConsumerRestarted).await.is_err() {
                        return;
                    }
                    // Consumed at once: senders may publish to it as soon as it exists.
                    if let Some(new) = checked.next {
                        adopt(&config, &mut c, new);
                    }
                }
                false
            }
        };
        if gone {
            tracing::warn!(
                "the Kafka broker is gone; this node's consumer waits for it to come back"
            );
            // Destroyed before the broker returns: see the module's note.
            for g in std::mem::take(&mut c.generations) {
                destroy(g.consumer).await;
            }
            destroy(c.sizer).await;
            checking = None;
            c = reopen(&config, &node_id).await;
            if tx.send(Inbound::Resumed).await.is_err() {
                return;
            }
            // Frames a sender published after that to a generation the broker lost (it may
            // ack them: Tansu does) reach no consumer. Senders forget their routes when every
            // broker goes away, and all move to the new generation within half the drain (a
            // lease tick and its settling time): then devices catch up again from the store.
            again = Some(Box::pin(tokio::time::sleep(
                Duration::from_secs(config.drain_secs) / 2,
            )));
        }
    }
}

/// Hands one consumed envelope to the node; false once the node stopped consuming.
async fn deliver(message: &BorrowedMessage<'_>, tx: &mpsc::Sender<Inbound>) -> bool {
    match message.payload().map(serde_json::from_slice::<Envelope>) {
        Some(Ok(envelope)) => {
            tracing::debug!(from = %envelope.from_node, "received a frame from the broker");
            tx.send(Inbound::Envelope(envelope)).await.is_ok()
        }
        Some(Err(e)) => {
            tracing::error!(
                offset = message.offset(),
                "skipping an unreadable envelope: {e}"
            );
            true
        }
        None => {
            tracing::error!(offset = message.offset(), "skipping an empty envelope");
            true
        }
    }
}

/// Lets go of retired generations whose time is up (their consumer destroyed, then their
/// topic deleted), fetches slowly from those whose senders have moved on, and looks at the
/// current generation (see [`check`]).
async fn upkeep(config: &KafkaConfig, node_id: &str, c: &mut Consuming, checking: &mut Checking) {
    let now = Instant::now();
    let (due, kept): (Vec<Generation>, Vec<Generation>) = std::mem::take(&mut c.generations)
        .into_iter()
        .partition(|g| g.retired.is_some_and(|r| r.delete_at <= now));
    c.generations = kept;
    for g in due {
        // In a task of its own: destroying a consumer and deleting a topic take hundreds of
        // milliseconds, and this loop delivers every frame to this node.
        let config = config.clone();
        tokio::spawn(async move {
            destroy(g.consumer).await;
            match delete_topics(&config, std::slice::from_ref(&g.topic)).await {
                Ok(()) => tracing::info!(topic = %g.topic, "deleted a retired topic of this node"),
                Err(e) => tracing::warn!(topic = %g.topic, "cannot delete a retired topic: {e}"),
            }
        });
    }
    for g in &mut c.generations {
        slow_down(config, node_id, g, now).await;
    }
    if checking.is_some() {
        return; // One at a time.
    }
    // One generation fetched fast besides the current one at a time: the broker's cost is
    // per consumer, and a topic is rotated at most every half of `kafka.drain_secs`.
    let may_rotate = !c
        .generations
        .iter()
        .any(|g| g.retired.is_some_and(|r| !r.slow));
    let Some(current) = c.generations.last() else {
        return;
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    *checking = Some(rx);
    let (config, node_id) = (config.clone(), node_id.to_string());
    let (sizer, topic) = (c.sizer.clone(), current.topic.clone());
    // The broker's answers (the topic's size, a new topic, a new consumer) are awaited in a
    // task of its own: this loop delivers every frame to this node meanwhile.
    tokio::spawn(async move {
        let _ = tx.send(check(&config, &node_id, sizer, topic, may_rotate).await);
    });
}

/// What the look under way found, once it is done (`None`: its task failed); never, when
/// none is under way.
async fn looked(checking: &mut Checking) -> Option<Checked> {
    match checking {
        Some(rx) => rx.await.ok(),
        None => std::future::pending().await,
    }
}

/// Consumes a new generation from now on; the current one retires.
fn adopt(config: &KafkaConfig, c: &mut Consuming, new: NewGeneration) {
    if let Some(old) = c.generations.last_mut() {
        tracing::info!(old = %old.topic, new = %new.topic, records = new.records, "this node's topic is large: moved to a new generation");
        old.retired = Some(Retired::now(config));
    }
    // The old generation's topic is deleted once retired: its sizer goes now.
    tokio::spawn(destroy(std::mem::replace(&mut c.sizer, new.sizer)));
    c.generations.push(Generation {
        topic: new.topic,
        consumer: new.consumer,
        from: Offset::Beginning,
        retired: None,
        behind: None,
    });
}

/// The current generation's size, and (if `may_rotate` and it holds `kafka.rotate_records`
/// records) a new generation: its topic and a consumer from its beginning.
async fn check(
    config: &KafkaConfig,
    node_id: &str,
    sizer: Arc<BaseConsumer>,
    topic: String,
    may_rotate: bool,
) -> Checked {
    let t = topic.clone();
    let size =
        tokio::task::spawn_blocking(move || sizer.fetch_watermarks(&t, 0, Duration::from_secs(3)))
            .await;
    let end = match size {
        Ok(Ok((_, high))) => Some(high),
        Ok(Err(e)) => {
            tracing::debug!(%topic, "size of this node's topic unknown: {e}");
            None
        }
        Err(_) => None,
    };
    let next = match end {
        Some(records) if may_rotate && records >= config.rotate_records as i64 => {
            next_generation(config, node_id, &topic, records).await
        }
        _ => None,
    };
    Checked { topic, end, next }
}

/// A new generation after `topic`, which holds `records` records.
async fn next_generation(
    config: &KafkaConfig,
    node_id: &str,
    topic: &str,
    records: i64,
) -> Option<NewGeneration> {
    let newest = topics::generation_of(config, node_id, topic).unwrap_or(0) + 1;
    let next = generation_topic(config, node_id, (now_ms().max(0) as u64).max(newest));
    let started = async {
        ensure_topics(config, std::slice::from_ref(&next)).await?;
        let consumer = consumer_of(
            config,
            node_id,
            &next,
            Offset::Beginning,
            config.fetch_wait_ms,
        )
        .await?;
        Ok::<_, BusError>((consumer, plain_client(config)?))
    };
    match started.await {
        Ok((consumer, sizer)) => Some(NewGeneration {
            topic: next,
            consumer,
            sizer,
            records,
        }),
        Err(e) => {
            tracing::warn!("cannot start a new generation of this node's topic: {e}");
            None
        }
    }
}

/// The watchdog of the current generation's consumer: the broker acked frames to this node's
/// topic, so they must reach its devices. If the broker holds records past the consumer's
/// position and the position has not moved for [`STALLED_AFTER`], the consumer is replaced by
/// one from that position (nothing is skipped or handed twice) and a warning says so. Returns
/// whether it replaced one. Once seen (CI, 2 runs of many): a consumer that had fetched its
/// first record handed on nothing more for a minute while senders' publishes were acked.
async fn watch(config: &KafkaConfig, node_id: &str, c: &mut Consuming, checked: &Checked) -> bool {
    let (Some(end), Some(g)) = (checked.end, c.generations.last_mut()) else {
        return false;
    };
    if g.topic != checked.topic {
        return false;
    }
    let Some(from) = position(g).await else {
        return false;
    };
    // A consumer from the beginning that handed on nothing yet is at the first record.
    let position = match from {
        Offset::Offset(o) => o,
        _ => 0,
    };
    let Some(stuck) = stalled(&mut g.behind, position, end, Instant::now()) else {
        return false;
    };
    tracing::warn!(
        topic = %g.topic,
        position,
        end,
        "this node's consumer has handed on nothing for {}s while the broker holds records past it; replacing it",
        stuck.as_secs()
    );
    replace_consumer(config, node_id, g, from, config.fetch_wait_ms).await
}

/// For how long a consumer at `position` has been stuck there while the broker holds `end`
/// records, once that is [`STALLED_AFTER`] or more (and then forgotten, to start over);
/// `behind` keeps the position and since when it has been seen behind.
fn stalled(
    behind: &mut Option<(i64, Instant)>,
    position: i64,
    end: i64,
    now: Instant,
) -> Option<Duration> {
    match *behind {
        _ if end <= position => *behind = None,
        Some((at, since)) if at == position => {
            let stuck = now.saturating_duration_since(since);
            if stuck >= STALLED_AFTER {
                *behind = None;
                return Some(stuck);
            }
        }
        _ => *behind = Some((position, now)),
    }
    None
}

/// Where `g`'s consumer hands on its next record: an offset once it handed one on, else
/// where it started.
async fn position(g: &Generation) -> Option<Offset> {
    let consumer = g.consumer.clone();
    let list = tokio::task::spawn_blocking(move || consumer.position())
        .await
        .ok()?
        .ok()?;
    match list.find_partition(&g.topic, 0).map(|p| p.offset()) {
        Some(Offset::Offset(o)) => Some(Offset::Offset(o)),
        _ => Some(g.from),
    }
}

/// Swaps `g`'s consumer for a new one from `from`, fetching every `fetch_wait_ms`.
async fn replace_consumer(
    config: &KafkaConfig,
    node_id: &str,
    g: &mut Generation,
    from: Offset,
    fetch_wait_ms: u64,
) -> bool {
    match consumer_of(config, node_id, &g.topic, from, fetch_wait_ms).await {
        Ok(new) => {
            let old = std::mem::replace(&mut g.consumer, new);
            destroy(old).await;
            g.from = from;
            true
        }
        Err(e) => {
            tracing::warn!(topic = %g.topic, "cannot replace this generation's consumer: {e}");
            false
        }
    }
}

/// Once a retired generation's senders have moved on, swaps its consumer for one that fetches
/// every [`SLOW_FETCH_WAIT_MS`] (librdkafka's fetch wait is fixed at creation), from where the
/// old one stopped handing messages to the node: nothing is skipped or handed twice.
async fn slow_down(config: &KafkaConfig, node_id: &str, g: &mut Generation, now: Instant) {
    let Some(retired) = g.retired.as_mut() else {
        return;
    };
    if retired.slow || now < retired.slow_at {
        return;
    }
    if config.fetch_wait_ms >= SLOW_FETCH_WAIT_MS {
        retired.slow = true; // Slow enough as it is.
        return;
    }
    let Some(from) = position(g).await else {
        return; // Try again at the next check.
    };
    if replace_consumer(config, node_id, g, from, SLOW_FETCH_WAIT_MS).await {
        if let Some(retired) = g.retired.as_mut() {
            retired.slow = true;
        }
        tracing::info!(topic = %g.topic, "senders moved on: fetching this retired generation slowly");
    }
}

/// New consumers once the broker answers again, trying every second.
async fn reopen(config: &KafkaConfig, node_id: &str) -> Consuming {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match open(config, node_id).await {
            Ok(c) => {
                tracing::info!(topic = %c.current(), "the Kafka broker is back; consuming a new generation of this node's topic");
                return c;
            }
            Err(e) => tracing::debug!("the Kafka broker is not back yet: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_stalled_only_when_stuck_behind_the_end_long_enough() {
        let t0 = Instant::now();
        let later = |s: u64| t0 + Duration::from_secs(s);
        let mut behind = None;
        // Caught up: nothing to watch.
        assert_eq!(stalled(&mut behind, 10, 10, t0), None);
        assert_eq!(behind, None);
        // Behind: noted, not yet stalled.
        assert_eq!(stalled(&mut behind, 10, 12, t0), None);
        assert_eq!(stalled(&mut behind, 10, 15, later(2)), None);
        // Moving, even slowly: the clock starts again.
        assert_eq!(stalled(&mut behind, 11, 15, later(3)), None);
        assert_eq!(stalled(&mut behind, 11, 15, later(5)), None);
        // Stuck at 11 for 3 s while the broker holds more: stalled, and forgotten.
        assert_eq!(
            stalled(&mut behind, 11, 16, later(6)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(behind, None);
        // Caught up after being behind: forgotten.
        assert_eq!(stalled(&mut behind, 11, 16, later(7)), None);
        assert_eq!(stalled(&mut behind, 16, 16, later(20)), None);
        assert_eq!(behind, None);
    }
}
