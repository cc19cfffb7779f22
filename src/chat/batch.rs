//! The path of chat messages through a node, in batches. A connection's reader checks a
//! message (moderation, id) and hands it here without waiting; one task takes whatever has
//! arrived meanwhile (up to [`MAX_BATCH`]) and, for the whole batch at once:
//!
//! 1. stores it (one store call: one Redis script call, one `SaveMessages` RPC) while it looks
//!    up every receiver's and sender's devices (one presence call);
//! 2. delivers to devices on this node, and queues one envelope per other node on the bus;
//! 3. hands the batch on to the completion task, and takes the next batch.
//!
//! The completion task waits for the bus (the broker's acks) batch after batch, in order, and
//! then acknowledges each message to its sending device, so `route` and `remoteFailed` say
//! what really happened.
//!
//! A node runs [`crate::config::Config::store_lanes`] such pairs of tasks. A lane stores one
//! batch at a time and acks in arrival order, and a connection's messages on their way all
//! take one lane: they are stored, delivered and acknowledged in the order it sent them,
//! however many are in flight. Lanes overlap: while one waits for the store (a batch's Redis
//! round trips behind the MessageService, each with its fsync), another's batch is on its
//! way, as the batches of two nodes are. A receiver's seqs may then reach a device out of
//! order, as from two nodes: the device's [`super::order`] puts them back in order.
//!
//! Which lane: a connection picks one whenever it has nothing in flight (all its earlier
//! messages stored, published and acknowledged, so none can be overtaken): the first lane
//! that is not busy ([`BUSY_AT`] messages waiting for a batch), else the least busy. Under
//! light load every message takes lane 0, in batches twice as large as over two lanes (half
//! the store calls and broker requests, each message waiting less); under load the lanes
//! fill one after the other. A retry of a send may take another lane than its first attempt:
//! the store keeps one of them (idempotency key), and the other is delivered again as a
//! duplicate, which devices drop by its seq.
//!
//! How many a connection may have in flight is bounded (`server.max_in_flight`): each holds
//! a permit of its connection's semaphore ([`InFlight`]) until its ack is queued.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::registry::SessionHandle;
use super::route::{Outgoing, Published, Reach, Target};
use super::Node;
use crate::bus::FrameKind;
use crate::protocol::{ErrorCode, FrameError, Route, ServerFrame};
use crate::store::{NewMessage, SaveOutcome, StoredMessage};

/// Most messages stored and routed together.
pub(super) const MAX_BATCH: usize = 256;

/// A lane with this many messages waiting for a batch is busy: a connection picking a lane
/// passes it by. About what arrives during one store call at 10,000 msg/s, an eighth of a
/// full batch; at 2,000 msg/s lane 0 holds 5-15.
pub(super) const BUSY_AT: usize = 32;

/// One store lane's queue, as the connections' readers see it.
pub(super) struct Lane {
    tx: mpsc::UnboundedSender<Pending>,
    /// Messages handed to the lane whose batch has not gone to the store yet (those of a
    /// batch still gathering during its linger count too).
    waiting: Arc<AtomicUsize>,
}

/// One store lane's end of its queue, for [`run`].
pub(super) struct LaneQueue {
    rx: mpsc::UnboundedReceiver<Pending>,
    waiting: Arc<AtomicUsize>,
}

/// `n` lanes: the readers' ends and the batch tasks' ends.
pub(super) fn lanes(n: usize) -> (Vec<Lane>, Vec<LaneQueue>) {
    (0..n)
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            let waiting = Arc::new(AtomicUsize::new(0));
            (
                Lane {
                    tx,
                    waiting: waiting.clone(),
                },
                LaneQueue { rx, waiting },
            )
        })
        .unzip()
}

impl Lane {
    /// Hands a message to this lane; gives it back if the lane's task is gone (the node is
    /// being dropped).
    pub(super) fn send(&self, p: Pending) -> Result<(), Box<Pending>> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.tx.send(p).map_err(|mpsc::error::SendError(p)| {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            Box::new(p)
        })
    }
}

/// The lane for a connection with nothing in flight, of `waiting` (each lane's messages
/// waiting for a batch): the first that is not busy, else the least busy.
fn pick(waiting: impl IntoIterator<Item = usize>) -> usize {
    let mut least = (usize::MAX, 0);
    for (i, n) in waiting.into_iter().enumerate() {
        if n < BUSY_AT {
            return i;
        }
        least = least.min((n, i));
    }
    least.1
}

/// A connection's chat messages on their way: at most `server.max_in_flight` (a permit each,
/// held until its ack is queued), all in one lane.
pub struct InFlight {
    permits: Arc<Semaphore>,
    limit: usize,
    lane: usize,
}

impl InFlight {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            lane: 0,
        }
    }

    /// A place for one more message: waits while `limit` are on their way.
    pub async fn permit(&self) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// The lane of the message that just took a permit: picked again among `lanes` when it
    /// is the only one on its way, else the lane of those before it.
    pub(super) fn lane(&mut self, lanes: &[Lane]) -> usize {
        if self.permits.available_permits() + 1 >= self.limit {
            self.lane = pick(lanes.iter().map(|l| l.waiting.load(Ordering::Relaxed)));
        }
        self.lane
    }
}

/// A checked message on its way, from the device that sent it.
pub(super) struct Pending {
    pub from: SessionHandle,
    pub message: NewMessage,
    /// The message's place in its connection's in-flight limit, given back with the ack.
    pub permit: OwnedSemaphorePermit,
    /// When the frame was handed to its lane (for `chatd_batch_wait_duration_seconds`).
    pub arrived: Instant,
}

/// A stored message waiting for its publishes before its ack.
struct Stored {
    from: SessionHandle,
    message: StoredMessage,
    /// Stored now (not a retry of a stored one).
    fresh: bool,
    permit: OwnedSemaphorePermit,
    /// Where its targets are in [`Routed::reach`]: the sender's other devices first, then
    /// the receiver (none for a note to self), or each receiving member of a group.
    targets: std::ops::Range<usize>,
}

/// The users of a batch, each once, in the order first met: what one presence call asks
/// for, and where each one's devices are in its answer (by a map, not a scan: a batch has up
/// to 512 users, more with groups). Each id is one allocation, shared by both.
struct Users {
    ids: Vec<Arc<str>>,
    index: foldhash::HashMap<Arc<str>, usize>,
}

impl Users {
    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            index: foldhash::HashMapExt::with_capacity(n),
        }
    }

    fn add(&mut self, user: &str) {
        if !self.index.contains_key(user) {
            let id: Arc<str> = user.into();
            self.index.insert(id.clone(), self.ids.len());
            self.ids.push(id);
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn position(&self, user: &str) -> Option<usize> {
        self.index.get(user).copied()
    }

    /// The users from the `first`-th on.
    fn from(&self, first: usize) -> Vec<&str> {
        self.ids[first..].iter().map(|u| &**u).collect()
    }
}

/// A routed batch: its messages and their targets, how far each target got so far, and the
/// envelopes still on their way.
struct Routed {
    stored: Vec<Stored>,
    reach: Vec<Reach>,
    published: Vec<Published>,
}

/// Takes one lane's messages in batches until the node is gone.
pub(super) async fn run(node: Weak<Node>, queue: LaneQueue) {
    let LaneQueue { mut rx, waiting } = queue;
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    tokio::spawn(complete(node.clone(), done_rx));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Some(node) = node.upgrade() else { break };
        let linger = node.config.server.batch_linger_us;
        if linger > 0 && batch.len() < MAX_BATCH {
            // What else arrives within the linger joins this batch: one store call and one
            // presence call for all of them (a batch of one costs the store about as much).
            tokio::time::sleep(std::time::Duration::from_micros(linger)).await;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
        }
        waiting.fetch_sub(batch.len(), Ordering::Relaxed);
        let routed = node.route_batch(std::mem::take(&mut batch)).await;
        if done_tx.send(routed).is_err() {
            break;
        }
    }
}

/// Acknowledges routed batches in order, once their envelopes reached the bus.
async fn complete(node: Weak<Node>, mut rx: mpsc::UnboundedReceiver<Routed>) {
    while let Some(mut routed) = rx.recv().await {
        let Some(node) = node.upgrade() else { break };
        let published = std::mem::take(&mut routed.published);
        node.settle(published, &mut routed.reach).await;
        node.acknowledge(routed);
    }
}

impl Node {
    /// Stores a batch, delivers it here and queues its envelopes to other nodes.
    async fn route_batch(&self, batch: Vec<Pending>) -> Routed {
        let mut heads = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        if let Some(oldest) = batch.first() {
            (self.metrics.batch_wait).observe(oldest.arrived.elapsed().as_secs_f64());
        }
        // Every receiver and sender of the batch, once, for one presence call.
        let mut users = Users::with_capacity(batch.len() * 2);
        for p in batch {
            users.add(&p.message.receiver_id);
            users.add(&p.message.sender_id);
            heads.push((p.from, p.permit, p.message.temp_message_id.clone()));
            messages.push(p.message);
        }
        let all = users.from(0);
        let save = async {
            let started = Instant::now();
            let saved = self.backends.store.save_batch(messages).await;
            (self.metrics.store_latency).observe(started.elapsed().as_secs_f64());
            saved
        };
        let (saved, devices) = tokio::join!(save, self.backends.presence.devices_many(&all));
        let mut devices = self.found(devices);
        // A group's members are known once it is saved (the store read them): one more
        // presence call for those the batch did not hold yet.
        let known = users.len();
        for s in saved.iter().flatten() {
            let (SaveOutcome::Saved(m) | SaveOutcome::Duplicate(m)) = s;
            for (u, _) in &m.member_seqs {
                users.add(u);
            }
        }
        if users.len() > known {
            let more = users.from(known);
            let found = self.found(self.backends.presence.devices_many(&more).await);
            devices = devices.zip(found).map(|(mut d, more)| {
                d.extend(more);
                d
            });
        }
        let devices_of = |user: &str| {
            let i = users.position(user)?;
            devices.as_ref().map(|d| d[i].as_slice())
        };

        let mut stored = Vec::with_capacity(heads.len());
        for ((from, permit, temp), saved) in heads.into_iter().zip(saved) {
            let (message, fresh) = match saved {
                Ok(SaveOutcome::Saved(m)) => (m, true),
                Ok(SaveOutcome::Duplicate(m)) => (m, false),
                Err(e) => {
                    self.refuse(from, permit, temp, &e);
                    continue;
                }
            };
            if fresh {
                self.metrics.messages_received.inc();
            }
            stored.push(Stored {
                from,
                message,
                fresh,
                permit,
                targets: 0..0,
            });
        }

        // A retry of a stored message is delivered again too: its first delivery may have
        // been cut short (the node died between store and publish). Devices that had it drop
        // it by its seq, so nobody gets it twice.
        let mut reach = Vec::with_capacity(stored.len() * 2);
        let mut outgoing = Outgoing::default();
        for s in stored.iter_mut() {
            let m = &s.message.message;
            // The sender's other devices get a copy at its place in the sender's inbox; a
            // note to self reaches the user's other devices once, as that copy.
            let mut targets =
                vec![Target::chat(m, &m.sender_id, s.message.sender_seq)
                    .except(&s.from.connection_id)];
            if m.group {
                targets.extend(
                    (s.message.member_seqs.iter()).map(|(u, seq)| Target::chat(m, u, *seq)),
                );
            } else if m.receiver_id != m.sender_id {
                targets.push(Target::chat(m, &m.receiver_id, s.message.receiver_seq));
            }
            s.targets = reach.len()..reach.len() + targets.len();
            for t in &targets {
                let slot = reach.len();
                let local = self.deliver_local(
                    t.user_id,
                    || t.frame().clone(),
                    FrameKind::Chat,
                    t.except,
                    t.seq,
                );
                reach.push(Reach {
                    local,
                    ..Reach::default()
                });
                if let Some(devices) = devices_of(t.user_id) {
                    outgoing.add(&self.node_id, slot, t, devices);
                }
            }
        }
        let published = outgoing.publish(self, FrameKind::Chat);
        Routed {
            stored,
            reach,
            published,
        }
    }

    /// The devices presence found, or `None` (counted and logged) when it failed: local
    /// delivery happens regardless; other nodes' devices catch up from the store at their
    /// next heartbeat.
    fn found<T>(&self, devices: Result<T, crate::presence::PresenceError>) -> Option<T> {
        devices
            .inspect_err(|e| {
                self.metrics.presence_failures.inc();
                tracing::warn!("presence lookup failed: {e}");
            })
            .ok()
    }

    /// A message the store refused: the sender is told why, with its `tempMessageId`.
    fn refuse(
        &self,
        from: SessionHandle,
        permit: OwnedSemaphorePermit,
        temp_message_id: Option<String>,
        why: &crate::store::StoreError,
    ) {
        let code = self.store_error_code(why);
        let message = if code == ErrorCode::StoreUnavailable {
            tracing::error!(user = %from.user_id, "store refused a message: {why}");
            format!("message not sent, the store failed ({why}); retry with the same tempMessageId")
        } else {
            format!("message not sent: {why}")
        };
        let e = FrameError {
            code,
            message,
            temp_message_id,
            missed: None,
        };
        self.reply_later(from, Some(permit), e);
    }

    /// Acks every message of a settled batch, in order; wakes receivers no device got.
    fn acknowledge(&self, routed: Routed) {
        let mut offline = Vec::new();
        for s in routed.stored {
            let m = &s.message.message;
            let reach = &routed.reach[s.targets.clone()];
            // The receivers' reach (any member's, in a group); a note to self counts where
            // the copy went.
            let (copy, receivers) = reach.split_first().unwrap_or((&Reach::ZERO, &[]));
            let to = if receivers.is_empty() {
                std::slice::from_ref(copy)
            } else {
                receivers
            };
            let route = Route::from_parts(
                to.iter().any(|r| r.local > 0),
                to.iter().any(|r| r.remote_nodes > 0),
            );
            let remote_failed = reach.iter().map(|r| r.failed_nodes).sum();
            // A receiver no device got it to (none online, or the publish to their node
            // failed) must be woken up; the message waits in the store.
            if s.fresh {
                let users = if m.group {
                    s.message
                        .member_seqs
                        .iter()
                        .map(|(u, _)| u.as_str())
                        .collect()
                } else {
                    vec![m.receiver_id.as_str()]
                };
                for (user, r) in users.into_iter().zip(receivers) {
                    if r.local == 0 && r.remote_nodes == 0 {
                        offline.push((user.to_string(), s.message.message.clone()));
                    }
                }
            }
            self.metrics.count_route(route);
            let ack: Utf8Bytes = ServerFrame::MessageAck {
                message_id: &m.message_id,
                temp_message_id: m.temp_message_id.as_deref(),
                timestamp: m.timestamp,
                route,
                remote_failed,
                seq: s.message.sender_seq,
            }
            .encode()
            .into();
            self.send_ack(&s.from, s.message.sender_seq, ack, Some(s.permit));
        }
        if !offline.is_empty() {
            if let Some(node) = self.me.upgrade() {
                tokio::spawn(async move {
                    for (user, m) in &offline {
                        node.offline_push(user, m).await;
                    }
                });
            }
        }
    }

    /// Sends an error to a device from a task of its own: the batch never waits for one
    /// device's queue. The permit (if any) is given back once the error is queued.
    pub(super) fn reply_later(
        &self,
        to: SessionHandle,
        permit: Option<OwnedSemaphorePermit>,
        error: FrameError,
    ) {
        self.metrics.frames_rejected.inc();
        let frame: Utf8Bytes = ServerFrame::from(&error).encode().into();
        let Err(frame) = to.try_reply(frame) else {
            return;
        };
        let Some(node) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            to.reply(frame, super::REPLY_PATIENCE, &node.metrics).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_takes_the_first_lane_not_busy_else_the_least_busy() {
        assert_eq!(pick([0, 0]), 0);
        assert_eq!(pick([BUSY_AT - 1, 0]), 0);
        assert_eq!(pick([BUSY_AT, 0]), 1);
        assert_eq!(pick([BUSY_AT, BUSY_AT + 5, 3]), 2);
        assert_eq!(pick([BUSY_AT + 9, BUSY_AT + 2, BUSY_AT + 5]), 1);
        assert_eq!(pick([BUSY_AT + 1, BUSY_AT + 1]), 0);
        assert_eq!(pick([7]), 0);
    }

    #[tokio::test]
    async fn a_connection_changes_lanes_only_with_nothing_in_flight() {
        let (lanes, _queues) = lanes(2);
        let mut in_flight = InFlight::new(4);
        // Lane 0 busy: the first message (nothing before it) goes to lane 1.
        lanes[0].waiting.store(BUSY_AT, Ordering::Relaxed);
        let first = in_flight.permit().await;
        assert_eq!(in_flight.lane(&lanes), 1);
        // Lane 0 free again, lane 1 busy: messages after it stay in lane 1 while it is on
        // its way, however busy.
        lanes[0].waiting.store(0, Ordering::Relaxed);
        lanes[1].waiting.store(BUSY_AT * 4, Ordering::Relaxed);
        let second = in_flight.permit().await;
        assert_eq!(in_flight.lane(&lanes), 1);
        drop(first);
        let third = in_flight.permit().await;
        assert_eq!(in_flight.lane(&lanes), 1, "the second is still on its way");
        drop((second, third));
        // Nothing on its way: picked again.
        let _fourth = in_flight.permit().await;
        assert_eq!(in_flight.lane(&lanes), 0);
    }

    /// Message `i` from user `u` to `v`, as a connection's reader hands it on.
    fn pending(i: usize) -> (Pending, crate::chat::registry::SessionEnds) {
        let (from, ends) = SessionHandle::new("u", &format!("c{i}"), 4);
        let permits = Arc::new(Semaphore::new(1));
        let p = Pending {
            from,
            message: NewMessage {
                message_id: format!("m{i}"),
                sender_id: "u".into(),
                receiver_id: "v".into(),
                chat_id: "c".into(),
                content: "hi".into(),
                timestamp: 0,
                temp_message_id: None,
                group: false,
            },
            permit: permits.try_acquire_owned().unwrap(),
            arrived: Instant::now(),
        };
        (p, ends)
    }

    #[tokio::test]
    async fn a_lane_counts_what_waits_for_a_batch() {
        let (lanes, mut queues) = lanes(1);
        for i in 0..3 {
            assert!(lanes[0].send(pending(i).0).is_ok());
        }
        assert_eq!(lanes[0].waiting.load(Ordering::Relaxed), 3);
        // The batch task's end gone: the message comes back, not counted.
        drop(queues.pop());
        assert!(lanes[0].send(pending(3).0).is_err());
        assert_eq!(lanes[0].waiting.load(Ordering::Relaxed), 3);
    }

    /// The other half of the count: a node's batch task takes the messages off it once their
    /// batch goes to the store, so a lane that served its load reads as free again.
    #[tokio::test]
    async fn a_lanes_count_comes_down_once_its_batch_is_taken() {
        let config = crate::config::Config::default();
        let backends = crate::chat::Backends::from_config(&config).unwrap();
        let node = Node::start(config, backends).await.unwrap();
        let lane = &node.chats[0];
        // The connections stay open meanwhile: their acks have somewhere to go.
        let mut connections = Vec::new();
        for i in 0..5 {
            let (p, ends) = pending(i);
            connections.push(ends);
            assert!(lane.send(p).is_ok());
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while lane.waiting.load(Ordering::Relaxed) != 0 {
            assert!(
                Instant::now() < deadline,
                "still counted: {}",
                lane.waiting.load(Ordering::Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
