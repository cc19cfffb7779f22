//! The message store (the seed's MessageService): save a message idempotently, mark it read.
//! One trait; `memory` is the embedded in-process store; gRPC arrives with the MessageService
//! issue.

pub mod grpc;
mod memory;
pub mod redis;

pub use self::grpc::GrpcStore;
pub use self::redis::RedisStore;
pub use memory::MemoryStore;

use async_trait::async_trait;

/// A message as the node built it: id and timestamp already assigned, content moderated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub message_id: String,
    pub sender_id: String,
    pub receiver_id: String,
    pub chat_id: String,
    pub content: String,
    pub timestamp: i64,
    /// The client's own id; with `sender_id` it makes a retried send idempotent.
    pub temp_message_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub message: NewMessage,
    /// When the receiver read it (unix ms), once it has.
    pub read_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Stored now.
    Saved(StoredMessage),
    /// The sender already stored a message with this `tempMessageId`: that one, unchanged.
    Duplicate(StoredMessage),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0:?} in chat {1:?}")]
    UnknownMessage(String, String),
    #[error("only the receiver of message {0:?} can mark it read")]
    NotReceiver(String),
    #[error("message store unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError>;
    /// Marks a message read by its receiver; returns it (its sender is who to tell).
    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<StoredMessage, StoreError>;
    async fn health(&self) -> Result<(), StoreError>;
    fn name(&self) -> &'static str;
}
