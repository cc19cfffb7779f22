//! The message path of one node: moderation, ids, store, then delivery to local devices and
//! targeted publishing to the nodes that hold the other devices.
//!
//! - [`ids`]: unique, time-ordered message ids
//! - [`moderation`]: the word-list automaton
//! - [`registry`]: this node's sessions and the handle that writes to one
//! - [`metrics`]: the node's counters
//! - [`order`]: in-order, exactly-once delivery to one device; `sync`: catching a device up
//!   from its user's inbox
//! - `offline`: offline-push windows; `upkeep`: this node's devices and lease in presence

pub mod ids;
pub mod metrics;
pub mod moderation;
mod offline;
pub mod order;
pub mod registry;
mod sync;
mod upkeep;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::watch;

use crate::bus::{Bus, Envelope, FrameKind, Inbound, KafkaBus, LocalBus, OfflinePush, Recipient};
use crate::config::{Config, PresenceBackend, RedisConfig};
use crate::presence::{MemoryPresence, Presence, PresenceError, RedisPresence};
use crate::protocol::{ChatSend, ErrorCode, FrameError, Route, ServerFrame};
use crate::redis_client::RedisClient;
use crate::store::{self, GrpcStore, SaveOutcome, Store, StoreError};
use ids::IdGenerator;
use metrics::Metrics;
use moderation::{Moderator, Rejected};
use registry::{Registry, SessionHandle};

/// How long a reply may wait for room in its connection's queue before the connection is
/// closed as too slow.
const REPLY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// The backends a node runs on; each is a trait object picked from config.
#[derive(Clone)]
pub struct Backends {
    pub presence: Arc<dyn Presence>,
    pub bus: Arc<dyn Bus>,
    pub store: Arc<dyn Store>,
}

impl Backends {
    /// The backends `config` names: in-process ones for the embedded default, Redis for
    /// presence in cluster mode.
    pub fn from_config(config: &Config) -> Result<Backends, NodeError> {
        let presence: Arc<dyn Presence> = match config.presence.backend {
            PresenceBackend::Memory => Arc::new(MemoryPresence::new(config.presence.ttl_secs)),
            PresenceBackend::Redis => {
                Arc::new(RedisPresence::from_config(config).map_err(NodeError::Redis)?)
            }
        };
        let bus: Arc<dyn Bus> = if config.kafka.brokers.is_empty() {
            Arc::new(LocalBus::new())
        } else {
            Arc::new(KafkaBus::new(&config.kafka)?)
        };
        let store: Arc<dyn Store> = if config.store.url.is_empty() {
            Arc::new(store::memory_store(&config.store))
        } else if config.store.url.starts_with("grpc://") {
            Arc::new(GrpcStore::new(
                &config.store.url,
                std::time::Duration::from_millis(config.store.timeout_ms),
                config.store.retries,
            )?)
        } else {
            let redis = RedisConfig {
                url: config.store.url.clone(),
                ..config.redis.clone()
            };
            Arc::new(store::redis_store(
                &config.store,
                RedisClient::new(&redis).map_err(NodeError::Redis)?,
            ))
        };
        Ok(Backends {
            presence,
            bus,
            store,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Moderation(#[from] moderation::ModerationError),
    #[error("cannot subscribe to the bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Presence(#[from] PresenceError),
    #[error("{0}")]
    Redis(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One chat node: config, backends, local sessions and counters.
pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub backends: Backends,
    pub sessions: Registry,
    pub metrics: Metrics,
    pub ids: IdGenerator,
    moderator: Moderator,
    /// This node, for the tasks it spawns (offline-push windows) without keeping it alive.
    me: std::sync::Weak<Node>,
    /// Offline-push windows open now, by (user, chat): the event they will send.
    pending_pushes: dashmap::DashMap<(String, String), OfflinePush>,
    /// Flips to `true` once shutdown begins: sessions close, upgrades are refused.
    shutdown: watch::Sender<bool>,
}

/// One user who should get a frame, the device that must not (the sender's own), and the
/// frame's place in that user's inbox (0 for frames that have none).
struct Target<'a> {
    user_id: &'a str,
    except: Option<&'a str>,
    seq: u64,
    frame: TargetFrame<'a>,
}

enum TargetFrame<'a> {
    Ready(Utf8Bytes),
    /// A chat message's frame is encoded only if some device needs it (a sender's copy
    /// mostly does not: most users have one device).
    Chat(&'a crate::store::NewMessage, std::cell::OnceCell<Utf8Bytes>),
}

impl<'a> Target<'a> {
    fn ready(user_id: &'a str, seq: u64, frame: Utf8Bytes) -> Self {
        Self {
            user_id,
            except: None,
            seq,
            frame: TargetFrame::Ready(frame),
        }
    }

    fn chat(m: &'a crate::store::NewMessage, user_id: &'a str, seq: u64) -> Self {
        Self {
            user_id,
            except: None,
            seq,
            frame: TargetFrame::Chat(m, std::cell::OnceCell::new()),
        }
    }

    fn frame(&self) -> &Utf8Bytes {
        match &self.frame {
            TargetFrame::Ready(frame) => frame,
            TargetFrame::Chat(m, encoded) => {
                encoded.get_or_init(|| sync::chat_frame(m, self.seq, self.user_id))
            }
        }
    }
}

/// Where one target's copy went.
#[derive(Debug, Default, Clone, Copy)]
struct Reach {
    local: usize,
    remote_nodes: usize,
    /// Nodes holding a device of this target that the publish failed for.
    failed_nodes: usize,
}

impl Node {
    /// Builds the node and starts consuming its bus queue.
    pub async fn start(config: Config, backends: Backends) -> Result<Arc<Node>, NodeError> {
        let moderator = Moderator::from_config(&config.moderation)?;
        let node_id = config.server.node_id.clone();
        let mut inbox = backends.bus.subscribe(&node_id).await?;
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            ids: IdGenerator::new(&node_id),
            node_id,
            backends,
            sessions: Registry::default(),
            metrics: Metrics::default(),
            moderator,
            pending_pushes: dashmap::DashMap::new(),
            shutdown: watch::channel(false).0,
            config,
        });
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            while let Some(inbound) = inbox.recv().await {
                let Some(node) = weak.upgrade() else { break };
                match inbound {
                    Inbound::Envelope(envelope) => node.deliver_envelope(envelope),
                    Inbound::Resumed => node.catch_up_everyone(),
                }
            }
        });
        // The first lease is taken before the node serves anyone.
        if let Err(e) = node
            .backends
            .presence
            .maintain(&node.node_id, &node.advertise_url())
            .await
        {
            tracing::warn!("presence unavailable at start ({e}); serving locally until it is back");
        }
        tokio::spawn(upkeep::maintain_presence(Arc::downgrade(&node)));
        Ok(node)
    }

    /// This node's REST base URL, as stored with its lease.
    pub fn advertise_url(&self) -> String {
        let s = &self.config.server;
        if s.advertise_url.is_empty() {
            format!("http://{}:{}", s.host, s.port)
        } else {
            s.advertise_url.clone()
        }
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Starts shutdown: sessions are asked to close with 1001, new upgrades are refused.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        self.sessions.close_all(1001, "server shutting down");
    }

    /// Ends shutdown: forgets this node's devices and stops consuming.
    pub async fn finish_shutdown(&self) {
        match self.backends.presence.clear_node(&self.node_id).await {
            Ok(n) => tracing::info!(devices = n, "cleared this node's presence"),
            Err(e) => tracing::warn!("could not clear this node's presence: {e}"),
        }
        self.backends.bus.unsubscribe(&self.node_id).await;
    }

    /// Sends a reply to one device (its own ack, error or pong), waiting for room in its
    /// queue up to `REPLY_PATIENCE`.
    pub async fn reply(&self, to: &SessionHandle, frame: &ServerFrame<'_>) {
        to.reply(frame.encode().into(), REPLY_PATIENCE, &self.metrics)
            .await;
    }

    pub async fn reply_error(&self, to: &SessionHandle, error: &FrameError) {
        Metrics::inc(&self.metrics.frames_rejected);
        self.reply(to, &ServerFrame::from(error)).await;
    }

    /// `CHAT_MESSAGE` from `from`: moderate, id, store, deliver, then acknowledge.
    pub async fn handle_chat(&self, from: &SessionHandle, send: ChatSend) {
        let ChatSend {
            receiver_id,
            chat_id,
            content,
            temp_message_id,
        } = send;
        let fail = |code: ErrorCode, message: String| FrameError {
            code,
            message,
            temp_message_id: temp_message_id.clone(),
        };
        // Most content passes untouched: keep the parsed string rather than copy it.
        let masked = match self.moderator.check(&content) {
            Ok(Cow::Borrowed(_)) => None,
            Ok(Cow::Owned(masked)) => Some(masked),
            Err(Rejected) => {
                let e = fail(
                    ErrorCode::ContentRejected,
                    "content refused by moderation; the message was not sent".into(),
                );
                return self.reply_error(from, &e).await;
            }
        };
        let (message_id, timestamp) = self.ids.next();
        let new = crate::store::NewMessage {
            message_id,
            sender_id: from.user_id.to_string(),
            receiver_id,
            chat_id,
            content: masked.unwrap_or(content),
            timestamp,
            temp_message_id: temp_message_id.clone(),
        };
        let (stored, fresh) = match self.backends.store.save(new).await {
            Ok(SaveOutcome::Saved(m)) => (m, true),
            Ok(SaveOutcome::Duplicate(m)) => (m, false),
            Err(e) => {
                Metrics::inc(&self.metrics.store_failures);
                tracing::error!(user = %from.user_id, "store refused a message: {e}");
                let e = fail(
                    ErrorCode::StoreUnavailable,
                    format!("message not sent, the store failed ({e}); retry with the same tempMessageId"),
                );
                return self.reply_error(from, &e).await;
            }
        };
        let m = &stored.message;

        if fresh {
            Metrics::inc(&self.metrics.messages_received);
        }
        // A retry of a stored message is delivered again too: its first delivery may have
        // been cut short (the node died between store and publish). Devices that had it drop
        // it by its seq, so nobody gets it twice.
        // The sender's other devices get a copy at its place in the sender's inbox.
        let copy = Target {
            except: Some(&*from.connection_id),
            ..Target::chat(m, &m.sender_id, stored.sender_seq)
        };
        let reach = if m.receiver_id == m.sender_id {
            // A note to self: the user's other devices get it once.
            self.fan_out(FrameKind::Chat, vec![copy]).await
        } else {
            let receiver = Target::chat(m, &m.receiver_id, stored.receiver_seq);
            self.fan_out(FrameKind::Chat, vec![receiver, copy]).await
        };
        let route = Route::from_parts(reach[0].local > 0, reach[0].remote_nodes > 0);
        // No device got it (none online, or the publish to their node failed): the receiver
        // must be woken up; the message waits in the store.
        if fresh && route == Route::Offline {
            self.offline_push(m).await;
        }
        let remote_failed = reach.iter().map(|r| r.failed_nodes).sum();
        self.metrics.count_route(route);
        tracing::debug!(message = %m.message_id, route = route.as_str(), "message acknowledged");
        let ack = ServerFrame::MessageAck {
            message_id: &m.message_id,
            temp_message_id: m.temp_message_id.as_deref(),
            timestamp: m.timestamp,
            route,
            remote_failed,
            seq: stored.sender_seq,
        }
        .encode();
        self.send_ack(from, stored.sender_seq, ack.into()).await;
    }

    /// `READ_RECEIPT` from the receiver: marked in the store, told to every device of the
    /// original sender (whom the store names, whatever the client claimed).
    pub async fn handle_read_receipt(&self, from: &SessionHandle, chat_id: &str, message_id: &str) {
        let receipt = match self
            .backends
            .store
            .mark_read(&from.user_id, chat_id, message_id)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let code = match e {
                    StoreError::UnknownMessage(..) => ErrorCode::UnknownMessage,
                    StoreError::NotReceiver(_) => ErrorCode::Forbidden,
                    StoreError::Unavailable(_) => {
                        Metrics::inc(&self.metrics.store_failures);
                        ErrorCode::StoreUnavailable
                    }
                };
                return self
                    .reply_error(from, &FrameError::new(code, e.to_string()))
                    .await;
            }
        };
        let m = &receipt.message.message;
        self.fan_out(
            FrameKind::Receipt,
            vec![Target::ready(
                &m.sender_id,
                receipt.seq,
                sync::receipt_frame(m, receipt.seq),
            )],
        )
        .await;
    }

    /// `TYPING`: to every device of the receiver, on any node; never stored.
    pub async fn handle_typing(
        &self,
        from: &SessionHandle,
        receiver_id: &str,
        chat_id: &str,
        typing: bool,
    ) {
        let frame: Utf8Bytes = ServerFrame::Typing {
            sender_id: &from.user_id,
            chat_id,
            content: if typing { "typing" } else { "stop_typing" },
        }
        .encode()
        .into();
        self.fan_out(
            FrameKind::Typing,
            vec![Target::ready(receiver_id, 0, frame)],
        )
        .await;
    }

    /// Delivers one frame to every target: directly to devices on this node, and one publish
    /// per other node that holds any target device (not one per user, not a broadcast).
    async fn fan_out(&self, kind: FrameKind, targets: Vec<Target<'_>>) -> Vec<Reach> {
        let mut reach = vec![Reach::default(); targets.len()];
        let mut by_node: BTreeMap<String, Vec<(usize, Recipient)>> = BTreeMap::new();
        // Devices here first: they never wait for presence.
        for (i, t) in targets.iter().enumerate() {
            reach[i].local =
                self.deliver_local(t.user_id, || t.frame().clone(), kind, t.except, t.seq);
        }
        // Then every target's devices elsewhere, looked up concurrently (one round trip).
        let lookups = futures_util::future::join_all(
            targets
                .iter()
                .map(|t| self.backends.presence.devices(t.user_id)),
        )
        .await;
        for (i, (t, lookup)) in targets.iter().zip(lookups).enumerate() {
            let devices = match lookup {
                Ok(d) => d,
                Err(e) => {
                    // Local delivery happens regardless; other nodes are unknown until
                    // presence answers again.
                    Metrics::inc(&self.metrics.presence_failures);
                    tracing::warn!(user = t.user_id, "presence lookup failed: {e}");
                    continue;
                }
            };
            for d in devices.into_iter().filter(|d| d.node_id != self.node_id) {
                let recipients = by_node.entry(d.node_id).or_default();
                if !recipients.iter().any(|(j, _)| *j == i) {
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
        for (node_id, recipients) in by_node {
            let indices: Vec<usize> = recipients.iter().map(|(i, _)| *i).collect();
            let envelope = Envelope {
                from_node: self.node_id.clone(),
                kind,
                recipients: recipients.into_iter().map(|(_, r)| r).collect(),
            };
            let started = std::time::Instant::now();
            let published = self.backends.bus.publish(&node_id, envelope).await;
            self.metrics.publish_latency.observe(started.elapsed());
            match published {
                Ok(()) => {
                    Metrics::inc(&self.metrics.messages_routed_remote);
                    tracing::info!(node = %node_id, kind = ?kind, "sent to another node via the {}", self.backends.bus.name());
                    for i in indices {
                        reach[i].remote_nodes += 1;
                    }
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.bus_failures);
                    tracing::error!(node = %node_id, "publish to another node failed: {e}");
                    for i in indices {
                        reach[i].failed_nodes += 1;
                    }
                }
            }
        }
        reach
    }

    /// Queues a frame to the devices of `user_id` on this node (in inbox order when it has a
    /// `seq`), starting a catch-up for devices that wait behind a gap. Returns how many
    /// devices take it.
    fn deliver_local(
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
        if kind == FrameKind::Chat {
            Metrics::add(
                &self.metrics.messages_delivered_local,
                delivered.devices as u64,
            );
        }
        delivered.devices
    }

    /// An envelope from another node: deliver to the named users' devices here.
    pub fn deliver_envelope(&self, envelope: Envelope) {
        Metrics::inc(&self.metrics.envelopes_consumed);
        for r in envelope.recipients {
            let frame = Utf8Bytes::from(r.frame);
            let n = self.deliver_local(
                &r.user_id,
                || frame.clone(),
                envelope.kind,
                r.except_connection.as_deref(),
                r.seq,
            );
            tracing::info!(from = %envelope.from_node, kind = ?envelope.kind, user = %r.user_id, devices = n, "received from another node; delivered to user");
        }
    }
}
