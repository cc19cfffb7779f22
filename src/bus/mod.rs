//! The bus between nodes: a frame for users on another node goes to that node's own queue
//! (targeted routing, never broadcast), and offline-push events go to their own sink. One
//! trait; `local` routes between nodes in this process (the embedded default, and in-process
//! clusters in tests); `kafka` between processes through a Kafka-compatible broker.

mod kafka;
mod local;

pub use kafka::{topic_state, KafkaBus, TopicState};
pub use local::LocalBus;

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How a frame may be treated when a device cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// Chat messages: never dropped silently.
    Chat,
    /// Read receipts: never dropped silently.
    Receipt,
    /// Typing indicators: dropped first (and counted) when a device falls behind.
    Typing,
}

/// A user on the target node who should get a frame, and the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipient {
    pub user_id: String,
    /// The sending device, which must not get its own message back as a copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except_connection: Option<String>,
    /// The frame's place in this user's inbox (0: it has none, as typing).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// The server frame, JSON text, exactly as this user's devices receive it (each user's
    /// copy carries that user's seq).
    pub frame: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Frames for users on one node: built by the sender's node, delivered as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub from_node: String,
    pub kind: FrameKind,
    pub recipients: Vec<Recipient>,
}

/// What a node's bus queue yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Envelope(Envelope),
    /// The bus was away and is back: frames published to this node meanwhile may be lost,
    /// so its devices catch up from the store. Kafka sends it twice: when its consumer is
    /// back, and once every sender has surely moved to the new generation.
    Resumed,
    /// A consumer of this node's queue handed on nothing while the broker held frames for
    /// it, and was replaced by one from where it stopped (counted and logged).
    ConsumerRestarted,
}

/// A message for a user with no device online: a push service should wake the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfflinePush {
    pub user_id: String,
    pub sender_id: String,
    pub chat_id: String,
    /// The latest message of the window.
    pub message_id: String,
    pub timestamp: i64,
    /// Messages in this chat the user missed within the window (1 without a window).
    pub count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no node {0:?} is subscribed to the bus")]
    UnknownNode(String),
    #[error("node {0:?} is not consuming (its queue is closed)")]
    Closed(String),
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// A publish under way. The envelope is queued by the time [`Bus::publish`] returns, so
/// envelopes for one node leave in the order they were published; this resolves once the bus
/// has it (for Kafka: the broker's ack, `acks=all`).
pub type Publish = Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>;

#[async_trait]
pub trait Bus: Send + Sync {
    /// Queues `envelope` for node `node_id` at once; the returned future says whether it got
    /// there. Publishes to different nodes are independent and may be awaited together.
    fn publish(&self, node_id: &str, envelope: Envelope) -> Publish;
    /// Emits an offline-push event.
    async fn offline_push(&self, event: OfflinePush) -> Result<(), BusError>;
    /// Starts consuming this node's queue.
    async fn subscribe(&self, node_id: &str) -> Result<mpsc::Receiver<Inbound>, BusError>;
    /// Stops consuming (graceful shutdown).
    async fn unsubscribe(&self, node_id: &str);
    async fn health(&self) -> Result<(), BusError>;
    fn name(&self) -> &'static str;
    /// Learns in advance how to reach these nodes, so that the first frame for one does not
    /// wait for it (Kafka: the metadata of their topics). Nothing to do in one process.
    async fn warm(&self, _node_ids: &[String]) {}
    /// Called with every live node (this one, `me`, included) at each lease tick while
    /// presence answers: lets go of what nodes long gone left behind (Kafka: their topic
    /// generations). Nothing to do in one process.
    async fn sweep(&self, _me: &str, _live: &[String]) {}
}
