//! The message path of one node: moderation, ids, store, then delivery to local devices and
//! targeted publishing to the nodes that hold the other devices.
//!
//! - `backends`: presence, bus and store, chosen once from config
//! - `batch`: chat messages stored and routed in batches; `route`: where a frame goes, the
//!   live frames, the sender's ack
//! - [`ids`]: unique, time-ordered message ids
//! - [`moderation`]: the word-list automaton
//! - [`registry`]: this node's sessions and the handle that writes to one; [`outbox`]: the
//!   bounded queue from that handle to the session's socket writer
//! - [`metrics`]: the node's counters
//! - [`order`]: in-order, exactly-once delivery to one device; `sync`: catching a device up
//!   from its user's inbox
//! - [`history`]: a chat's history, paged back from the store
//! - `offline`: offline-push windows; `upkeep`: this node's devices and lease in presence

mod backends;
mod batch;
pub mod history;
pub mod ids;
pub mod metrics;
pub mod moderation;
mod offline;
pub mod order;
pub mod outbox;
pub mod registry;
mod route;
mod sync;
mod upkeep;

use std::borrow::Cow;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{mpsc, watch};

use crate::bus::{FrameKind, Inbound, OfflinePush};
use crate::config::Config;
use crate::protocol::{ChatSend, ErrorCode, FrameError, ServerFrame};
use crate::store::StoreError;
pub use backends::{Backends, NodeError};
pub use batch::InFlight;
use ids::IdGenerator;
use metrics::Metrics;
use moderation::{Moderator, Rejected};
use registry::{Registry, SessionHandle};
use route::Target;

/// How long a reply may wait for room in its connection's queue before the connection is
/// closed as too slow.
const REPLY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Chat messages checked by their connection's reader, for the batched path: one queue
    /// per store lane (`server.store_lanes`).
    chats: Vec<batch::Lane>,
    /// Devices that sent a heartbeat, for a look at what they may have missed (`sync`).
    probes: mpsc::UnboundedSender<SessionHandle>,
}

impl Node {
    /// Builds the node and starts consuming its bus queue.
    pub async fn start(config: Config, backends: Backends) -> Result<Arc<Node>, NodeError> {
        let moderator = Moderator::from_config(&config.moderation)?;
        let node_id = config.server.node_id.clone();
        let mut inbox = backends.bus.subscribe(&node_id).await?;
        let (chats, lanes) = batch::lanes(config.store_lanes());
        let (probes, probes_rx) = mpsc::unbounded_channel();
        let node = Arc::new_cyclic(|me| Node {
            chats,
            probes,
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
        for lane in lanes {
            tokio::spawn(batch::run(Arc::downgrade(&node), lane));
        }
        tokio::spawn(sync::probe_heartbeats(Arc::downgrade(&node), probes_rx));
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            while let Some(inbound) = inbox.recv().await {
                let Some(node) = weak.upgrade() else { break };
                match inbound {
                    Inbound::Envelope(envelope) => node.deliver_envelope(envelope),
                    Inbound::Resumed => node.catch_up_everyone(),
                    Inbound::ConsumerRestarted => {
                        node.metrics.consumer_restarts.inc();
                    }
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
        node.warm_routes().await;
        tokio::spawn(upkeep::maintain_presence(Arc::downgrade(&node)));
        tokio::spawn(upkeep::refresh_presence(Arc::downgrade(&node)));
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
        self.metrics.frames_rejected.inc();
        self.reply(to, &ServerFrame::from(error)).await;
    }

    /// `CHAT_MESSAGE` from `from`: moderated and given its id here, then handed to the
    /// batched path (`batch`), which stores, delivers and acknowledges it. Returns once it
    /// is handed on: at the connection's in-flight limit, that waits for an earlier ack.
    pub async fn submit_chat(
        &self,
        from: &SessionHandle,
        send: ChatSend,
        in_flight: &mut InFlight,
    ) {
        let permit = in_flight.permit().await;
        let ChatSend {
            receiver_id,
            chat_id,
            content,
            temp_message_id,
            group,
        } = send;
        // Most content passes untouched: keep the parsed string rather than copy it.
        let content = match self.moderator.check(&content) {
            Ok(Cow::Borrowed(_)) => content,
            Ok(Cow::Owned(masked)) => masked,
            Err(Rejected) => {
                let e = FrameError {
                    code: ErrorCode::ContentRejected,
                    message: "content refused by moderation; the message was not sent".into(),
                    temp_message_id,
                    missed: None,
                };
                return self.reply_error(from, &e).await;
            }
        };
        let (message_id, timestamp) = self.ids.next();
        let message = crate::store::NewMessage {
            message_id,
            sender_id: from.user_id.to_string(),
            receiver_id,
            chat_id,
            content,
            timestamp,
            temp_message_id,
            group,
        };
        let pending = batch::Pending {
            from: from.clone(),
            message,
            permit,
            arrived: std::time::Instant::now(),
        };
        let lane = &self.chats[in_flight.lane(&self.chats)];
        if let Err(p) = lane.send(pending) {
            // Only while the node is being dropped.
            let e = FrameError {
                code: ErrorCode::StoreUnavailable,
                message: "this node is stopping; send again after reconnecting".into(),
                temp_message_id: p.message.temp_message_id,
                missed: None,
            };
            self.reply_error(from, &e).await;
        }
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
                let code = self.store_error_code(&e);
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
                route::receipt_frame(m, &receipt.reader_id, receipt.seq),
            )],
        )
        .await;
    }

    /// A store's refusal as a client gets it (frame or REST); a store that failed is counted.
    pub fn store_refusal(&self, e: &StoreError) -> FrameError {
        FrameError::new(self.store_error_code(e), e.to_string())
    }

    /// The error code a client gets for a store's refusal; a store that failed is counted.
    fn store_error_code(&self, e: &StoreError) -> ErrorCode {
        match e {
            StoreError::UnknownMessage(..) => ErrorCode::UnknownMessage,
            StoreError::NotReceiver(_)
            | StoreError::NotMember(..)
            | StoreError::NotInGroup(..)
            | StoreError::NotAdmin(..) => ErrorCode::Forbidden,
            StoreError::NoSuchGroup(_) => ErrorCode::UnknownGroup,
            StoreError::GroupExists(_) => ErrorCode::GroupExists,
            StoreError::GroupFull(..) => ErrorCode::GroupFull,
            StoreError::LastAdmin(..) => ErrorCode::LastAdmin,
            StoreError::Unavailable(_) | StoreError::Redis(_) => {
                self.metrics.store_failures.inc();
                ErrorCode::StoreUnavailable
            }
        }
    }

    /// `TYPING`: to every device of the receiver (or of every other member of the group),
    /// on any node; never stored.
    pub async fn handle_typing(
        &self,
        from: &SessionHandle,
        receiver_id: &str,
        chat_id: &str,
        typing: bool,
        group: bool,
    ) {
        let frame: Utf8Bytes = ServerFrame::Typing {
            sender_id: &from.user_id,
            group_id: group.then_some(receiver_id),
            chat_id,
            content: if typing { "typing" } else { "stop_typing" },
        }
        .encode()
        .into();
        let members;
        let receivers: Vec<&str> = if group {
            members = match self
                .backends
                .store
                .members(receiver_id, &from.user_id)
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    let code = self.store_error_code(&e);
                    return self
                        .reply_error(from, &FrameError::new(code, e.to_string()))
                        .await;
                }
            };
            members
                .iter()
                .map(|m| m.user_id.as_str())
                .filter(|u| *u != from.user_id.as_ref())
                .collect()
        } else {
            vec![receiver_id]
        };
        let targets = receivers
            .into_iter()
            .map(|u| Target::ready(u, 0, frame.clone()))
            .collect();
        self.fan_out(FrameKind::Typing, targets).await;
    }
}
