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
//! A node runs [`crate::config::Config::store_lanes`] such pairs of tasks, each for its own
//! share of the senders ([`lane`]: by user id, so all of a user's messages on this node take
//! one lane). A lane stores one batch at a time and acks in arrival order: a connection's
//! messages are stored, delivered and acknowledged in the order it sent them, however many are
//! in flight, and a retry of a send on this node meets its first attempt in the same lane,
//! after it. Lanes overlap: while one waits for the store (a batch's Redis round trips behind
//! the MessageService, each with its fsync), another's batch is on its way, as the batches of
//! two nodes are. A receiver's seqs may then reach a device out of order, as from
//! two nodes: the device's [`super::order`] puts them back in order.
//!
//! How many a connection may have in flight is bounded (`server.max_in_flight`): each holds
//! a permit of its connection's semaphore until its ack is queued.

use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::registry::SessionHandle;
use super::route::{Outgoing, Published, Reach, Target};
use super::Node;
use crate::bus::FrameKind;
use crate::protocol::{ErrorCode, FrameError, Route, ServerFrame};
use crate::store::{NewMessage, SaveOutcome, StoredMessage};

/// Most messages stored and routed together.
pub(super) const MAX_BATCH: usize = 256;

/// The lane of a sender's messages, of `lanes`: the same for every message of a user while
/// the node runs.
pub(super) fn lane(user_id: &str, lanes: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    if lanes <= 1 {
        return 0;
    }
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user_id);
    (hash % lanes as u64) as usize
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
pub(super) async fn run(node: Weak<Node>, mut rx: mpsc::UnboundedReceiver<Pending>) {
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
    use super::lane;

    #[test]
    fn a_user_keeps_its_lane_and_users_spread_over_the_lanes() {
        for lanes in [1, 2, 3, 8] {
            let mut used = vec![0; lanes];
            for i in 0..1000 {
                let user = format!("user-{i}");
                let l = lane(&user, lanes);
                assert!(l < lanes);
                assert_eq!(l, lane(&user, lanes), "{user} changed lane");
                used[l] += 1;
            }
            // Every lane gets a fair share (1000 users: at least half the even share).
            assert!(used.iter().all(|&n| n >= 500 / lanes), "{used:?}");
        }
    }
}
