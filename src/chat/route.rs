//! Routing: where a frame goes once it is decided, and how the live frames are encoded.
//! Devices on this node get it directly (in inbox order, see `order`); devices on other nodes
//! through the bus, one envelope per node that holds any of them (targeted, never a
//! broadcast), all envelopes of one call queued at once and awaited together. An envelope
//! from another node is delivered here, and the sending device's ack goes out from here, in
//! order with the rest of what that device gets. (`sync` only catches devices up.)

use std::collections::BTreeMap;

use axum::extract::ws::Utf8Bytes;

use tokio::sync::OwnedSemaphorePermit;

use super::order::{Decision, Held};
use super::registry::SessionHandle;
use super::{Node, REPLY_PATIENCE};
use crate::bus::{Envelope, FrameKind, Publish, Recipient};
use crate::presence::Device;
use crate::protocol::ServerFrame;
use crate::store::NewMessage;

/// A chat message as the devices of one user see it: with its place in that user's inbox;
/// the sender's own copies also carry the sending device's `tempMessageId`.
pub fn chat_frame(m: &NewMessage, seq: u64, for_user: &str) -> Utf8Bytes {
    ServerFrame::ChatMessage {
        message_id: &m.message_id,
        sender_id: &m.sender_id,
        receiver_id: &m.receiver_id,
        group_id: m.group.then_some(m.receiver_id.as_str()),
        chat_id: &m.chat_id,
        content: &m.content,
        timestamp: m.timestamp,
        seq,
        temp_message_id: if m.sender_id == for_user {
            m.temp_message_id.as_deref()
        } else {
            None
        },
    }
    .encode()
    .into()
}

/// A read receipt as the devices of the message's sender see it: `reader_id` read it (the
/// receiver, or a member of its group).
pub fn receipt_frame(m: &NewMessage, reader_id: &str, seq: u64) -> Utf8Bytes {
    ServerFrame::ReadReceipt {
        chat_id: &m.chat_id,
        message_id: &m.message_id,
        reader_id,
        seq,
    }
    .encode()
    .into()
}

/// An ack that waits for room in its device's queue.
struct AckWait {
    frame: Utf8Bytes,
    /// Frames after it are held meanwhile: a catch-up sends them once it is out.
    catch_up_after: bool,
}

/// Most recipients in one envelope: a batch for one node leaves in records of at most this
/// many frames, well under a broker's message size limit.
const MAX_RECIPIENTS: usize = 256;

/// One user who should get a frame, the device that must not (the sender's own), and the
/// frame's place in that user's inbox (0 for frames that have none).
pub(super) struct Target<'a> {
    pub user_id: &'a str,
    pub except: Option<&'a str>,
    pub seq: u64,
    frame: TargetFrame<'a>,
}

enum TargetFrame<'a> {
    Ready(Utf8Bytes),
    /// A chat message's frame is encoded only if some device needs it (a sender's copy
    /// mostly does not: most users have one device).
    Chat(&'a NewMessage, std::cell::OnceCell<Utf8Bytes>),
}

impl<'a> Target<'a> {
    pub fn ready(user_id: &'a str, seq: u64, frame: Utf8Bytes) -> Self {
        Self {
            user_id,
            except: None,
            seq,
            frame: TargetFrame::Ready(frame),
        }
    }

    /// The sender's other devices: every one but `except`, the sending device.
    pub fn except(self, connection_id: &'a str) -> Self {
        Self {
            except: Some(connection_id),
            ..self
        }
    }

    pub fn chat(m: &'a NewMessage, user_id: &'a str, seq: u64) -> Self {
        Self {
            user_id,
            except: None,
            seq,
            frame: TargetFrame::Chat(m, std::cell::OnceCell::new()),
        }
    }

    pub fn frame(&self) -> &Utf8Bytes {
        match &self.frame {
            TargetFrame::Ready(frame) => frame,
            TargetFrame::Chat(m, encoded) => {
                encoded.get_or_init(|| chat_frame(m, self.seq, self.user_id))
            }
        }
    }
}

/// Where one target's copy went.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Reach {
    pub local: usize,
    pub remote_nodes: usize,
    /// Nodes holding a device of this target that the publish failed for.
    pub failed_nodes: usize,
}

impl Reach {
    pub const ZERO: Reach = Reach {
        local: 0,
        remote_nodes: 0,
        failed_nodes: 0,
    };
}

/// Envelopes under construction: for each other node, its recipients and the targets (by
/// the caller's index) they serve.
#[derive(Default)]
pub(super) struct Outgoing {
    by_node: BTreeMap<String, Vec<(usize, Recipient)>>,
}

/// Envelopes queued on the bus, each with the targets it serves.
pub(super) struct Published {
    node_id: String,
    targets: Vec<usize>,
    publish: Publish,
    started: std::time::Instant,
}

impl Outgoing {
    /// Adds target `i`'s devices that are on other nodes than `me` (once per node).
    pub fn add(&mut self, me: &str, i: usize, t: &Target<'_>, devices: &[Device]) {
        for d in devices.iter().filter(|d| d.node_id != me) {
            let recipients = self.by_node.entry(d.node_id.clone()).or_default();
            // Targets come in order: a second device of this one on that node is the last.
            if recipients.last().is_none_or(|(j, _)| *j != i) {
                recipients.push((
                    i,
                    Recipient {
                        user_id: t.user_id.to_string(),
                        except_connection: t.except.map(String::from),
                        seq: t.seq,
                        frame: t.frame().as_str().to_string(),
                    },
                ));
            }
        }
    }

    /// Queues every envelope on the bus now, in order.
    pub fn publish(self, node: &Node, kind: FrameKind) -> Vec<Published> {
        let mut out = Vec::new();
        for (node_id, recipients) in self.by_node {
            let mut recipients = recipients.into_iter().peekable();
            while recipients.peek().is_some() {
                let chunk: Vec<(usize, Recipient)> =
                    recipients.by_ref().take(MAX_RECIPIENTS).collect();
                let targets = chunk.iter().map(|(i, _)| *i).collect();
                let envelope = Envelope {
                    from_node: node.node_id.clone(),
                    kind,
                    recipients: chunk.into_iter().map(|(_, r)| r).collect(),
                };
                out.push(Published {
                    publish: node.backends.bus.publish(&node_id, envelope),
                    node_id: node_id.clone(),
                    targets,
                    started: std::time::Instant::now(),
                });
            }
        }
        out
    }
}

impl Node {
    /// Waits for every queued envelope (together) and records in `reach` which targets got to
    /// their nodes and which did not.
    pub(super) async fn settle(&self, published: Vec<Published>, reach: &mut [Reach]) {
        let results = futures_util::future::join_all(published.into_iter().map(|p| async move {
            let result = p.publish.await;
            (p.node_id, p.targets, p.started, result)
        }))
        .await;
        for (node_id, targets, started, result) in results {
            self.metrics
                .publish_latency
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    self.metrics.messages_routed_remote.inc();
                    tracing::debug!(node = %node_id, frames = targets.len(), "sent to another node via the {}", self.backends.bus.name());
                    for i in targets {
                        reach[i].remote_nodes += 1;
                    }
                }
                Err(e) => {
                    self.metrics.bus_failures.inc();
                    tracing::error!(node = %node_id, "publish to another node failed: {e}");
                    for i in targets {
                        reach[i].failed_nodes += 1;
                    }
                }
            }
        }
    }

    /// Delivers one frame to every target: directly to devices on this node, and one
    /// envelope per other node that holds any target device. Used for receipts and typing;
    /// chat messages go through the batched path (`batch`).
    pub(super) async fn fan_out(&self, kind: FrameKind, targets: Vec<Target<'_>>) -> Vec<Reach> {
        let mut reach = vec![Reach::default(); targets.len()];
        // Devices here first: they never wait for presence.
        for (i, t) in targets.iter().enumerate() {
            reach[i].local =
                self.deliver_local(t.user_id, || t.frame().clone(), kind, t.except, t.seq);
        }
        let users: Vec<&str> = targets.iter().map(|t| t.user_id).collect();
        let mut outgoing = Outgoing::default();
        match self.backends.presence.devices_many(&users).await {
            Ok(devices) => {
                for (i, (t, devices)) in targets.iter().zip(devices).enumerate() {
                    outgoing.add(&self.node_id, i, t, &devices);
                }
            }
            Err(e) => {
                // Local delivery happened regardless; other nodes are unknown until presence
                // answers again (their devices catch up from the store).
                self.metrics.presence_failures.inc();
                tracing::warn!("presence lookup failed: {e}");
            }
        }
        let published = outgoing.publish(self, kind);
        self.settle(published, &mut reach).await;
        reach
    }

    /// Queues a frame to the devices of `user_id` on this node (in inbox order when it has a
    /// `seq`), starting a catch-up for devices that wait behind a gap. Returns how many
    /// devices take it.
    pub(super) fn deliver_local(
        &self,
        user_id: &str,
        frame: impl Fn() -> Utf8Bytes,
        kind: FrameKind,
        except: Option<&str>,
        seq: u64,
    ) -> usize {
        let delivered = self
            .sessions
            .deliver(user_id, frame, kind, except, seq, &self.metrics);
        for h in &delivered.catch_up {
            self.spawn_catch_up(h);
        }
        for (h, frame) in delivered.waits {
            self.spawn_wait(h, frame, true, None);
        }
        if kind == FrameKind::Chat {
            self.metrics
                .messages_delivered_local
                .inc_by(delivered.devices as u64);
        }
        delivered.devices
    }

    /// An envelope from another node: deliver to the named users' devices here.
    pub fn deliver_envelope(&self, envelope: Envelope) {
        self.metrics.envelopes_consumed.inc();
        for r in envelope.recipients {
            let frame = Utf8Bytes::from(r.frame);
            let n = self.deliver_local(
                &r.user_id,
                || frame.clone(),
                envelope.kind,
                r.except_connection.as_deref(),
                r.seq,
            );
            tracing::debug!(from = %envelope.from_node, kind = ?envelope.kind, user = %r.user_id, devices = n, "received from another node; delivered to user");
        }
    }

    /// Acknowledges the device's own send at `seq` (its place in the sender's inbox), in
    /// order with the rest of what the device gets. An ack is never dropped.
    /// Never waits: when the device's queue is full, the rest is done by a task of its own
    /// (the batched chat path must not wait for one slow device). `permit`, the message's
    /// place in its connection's in-flight limit, is given back once the ack is queued.
    pub(super) fn send_ack(
        &self,
        handle: &SessionHandle,
        seq: u64,
        frame: Utf8Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if let Some(wait) = self.offer_ack(handle, seq, frame) {
            self.spawn_wait(handle.clone(), wait.frame, wait.catch_up_after, permit);
        }
    }

    /// A frame that is next in order for a device whose queue is full: a task waits for room
    /// (up to `REPLY_PATIENCE`, then the device is closed as a slow consumer), and with
    /// `catch_up_after` then sends what was held meanwhile.
    pub(super) fn spawn_wait(
        &self,
        handle: SessionHandle,
        frame: Utf8Bytes,
        catch_up_after: bool,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let Some(node) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            handle.reply(frame, REPLY_PATIENCE, &node.metrics).await;
            drop(permit);
            if catch_up_after {
                node.catch_up(&handle, false).await;
            }
        });
    }

    /// Decides an ack and queues it if there is room; returns what is left when the queue
    /// is full.
    fn offer_ack(&self, handle: &SessionHandle, seq: u64, frame: Utf8Bytes) -> Option<AckWait> {
        if seq == 0 {
            return handle.try_reply(frame).err().map(|frame| AckWait {
                frame,
                catch_up_after: false,
            });
        }
        let held = Held {
            frame: frame.clone(),
            kind: FrameKind::Chat,
            ack: true,
        };
        let (decision, catch_up_after) = {
            let mut order = handle.order();
            let catching_up = order.is_catching_up();
            match order.offer_ack(seq, held, handle.max_held()) {
                Decision::Send => match handle.try_reply(frame.clone()) {
                    Ok(()) => return None,
                    // Full: hold everything after it while this waits for room.
                    Err(_) => (Decision::Send, !catching_up && order.begin_catch_up(false)),
                },
                d => (d, false),
            }
        };
        match decision {
            Decision::Send => {
                return Some(AckWait {
                    frame,
                    catch_up_after,
                })
            }
            Decision::CatchUp => self.spawn_catch_up(handle),
            Decision::Overflow => handle.close_too_far_behind(&self.metrics),
            Decision::Held | Decision::Duplicate => {}
        }
        None
    }
}
