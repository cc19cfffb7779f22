//! The message store (the seed's MessageService): save a message idempotently, mark it read,
//! and keep every user's inbox: each message a user received or sent, and each receipt for a
//! message it sent, at a per-user sequence number (`seq`) that only grows and has no gaps.
//! A device that was away asks for everything after the last seq it saw.
//!
//! One trait; `memory` is the embedded in-process store, `redis` a store shared by nodes,
//! `grpc` the client of a MessageService (`chatd message-service`) in front of either.

pub mod grpc;
mod memory;
pub mod migrate;
pub mod redis;

pub use self::grpc::GrpcStore;
pub use self::redis::RedisStore;
pub use memory::MemoryStore;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::StoreConfig;

/// The in-process store `config` describes.
pub fn memory_store(config: &StoreConfig) -> MemoryStore {
    MemoryStore::new(config.memory_max_messages, config.inbox_max_entries)
        .with_group_max_members(config.group_max_members)
}

/// The Redis store `config` describes, on `redis`.
pub fn redis_store(config: &StoreConfig, redis: crate::redis_client::RedisClient) -> RedisStore {
    let redis = redis.waiting_for_replicas(config.wait_replicas, config.wait_timeout_ms);
    RedisStore::new(redis, config.retention_secs, config.inbox_max_entries)
        .with_group_max_members(config.group_max_members)
}

/// Most members `store.group_max_members` may allow: a group message is saved in one step per
/// member, and its frame travels in envelopes of up to 256 recipients per node.
pub const MAX_GROUP_MEMBERS: usize = 10_000;

/// `store.group_max_members` when a store is built without config (tests).
pub const DEFAULT_GROUP_MAX_MEMBERS: usize = 1000;

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
    /// `receiver_id` (and `chat_id`) name a group: every member but the sender receives it,
    /// each at a place in its own inbox.
    pub group: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Shared, not copied: the store, the batch and every frame of a message read one copy
    /// (cloning its five strings was 5 % of a node's CPU).
    pub message: Arc<NewMessage>,
    /// When the receiver read it (unix ms), once it has.
    pub read_at: Option<i64>,
    /// Its place in the receiver's inbox and in the sender's (the same place for a note to
    /// self). 0 only in a message not stored yet.
    pub receiver_seq: u64,
    pub sender_seq: u64,
    /// A group message: each member's place in its inbox (but the sender's, `sender_seq`),
    /// as the store placed it; empty for a direct message. `receiver_seq` is the asking
    /// member's own place in a message read back from a member's inbox.
    pub member_seqs: Vec<(String, u64)>,
}

impl StoredMessage {
    /// A message before the store gave it its places.
    pub fn unsequenced(message: NewMessage) -> Self {
        Self {
            message: Arc::new(message),
            read_at: None,
            receiver_seq: 0,
            sender_seq: 0,
            member_seqs: Vec::new(),
        }
    }

    /// The message's place in `user_id`'s inbox, as this copy knows it.
    pub fn seq_of(&self, user_id: &str) -> u64 {
        if self.message.sender_id == user_id {
            self.sender_seq
        } else {
            self.receiver_seq
        }
    }
}

/// A read receipt as stored: the message read, and the receipt's place in the inbox of the
/// message's sender (who is told).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub message: StoredMessage,
    pub seq: u64,
    /// Who read it: the receiver, or in a group the member who did.
    pub reader_id: String,
}

/// What a place in a user's inbox holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A message the user received, or sent (from any of its devices).
    Message,
    /// A receipt: the receiver read a message this user sent.
    Receipt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub seq: u64,
    pub kind: EntryKind,
    pub message: StoredMessage,
    /// A receipt's reader: the message's receiver, or the member of its group who read it.
    /// Empty for a message.
    pub reader_id: String,
}

/// One page of a user's inbox after a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxPage {
    /// In seq order, each after the cursor; at most the limit asked for.
    pub entries: Vec<InboxEntry>,
    /// The oldest seq the store still keeps (`latest + 1` when it keeps none). A cursor below
    /// `oldest - 1` has lost entries: the client must be told, never given a silent gap.
    pub oldest: u64,
    /// The newest seq given out for this user (0 before the first).
    pub latest: u64,
}

/// Longest page [`Store::fetch`] returns, whatever the caller asks for.
pub const MAX_PAGE: usize = 1000;

/// Longest page of a chat's history [`Store::fetch_chat`] returns, whatever the caller asks
/// for: each message is whole in the answer (an inbox page is read to catch up, a history
/// page to show).
pub const MAX_HISTORY_PAGE: usize = 100;

/// One page of a chat's history as one of its users sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatPage {
    /// Newest first, each older than the cursor; `seq` is each message's place in the inbox
    /// of the user who asked.
    pub messages: Vec<HistoryMessage>,
    /// Older messages of the chat are kept: page on with the last message's id.
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryMessage {
    pub message: StoredMessage,
    /// Its place in the inbox of the user who asked.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Stored now.
    Saved(StoredMessage),
    /// The sender already stored a message with this `tempMessageId`: that one, unchanged.
    Duplicate(StoredMessage),
}

/// What a member may do in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Adds and removes members (the group's creator, and members an admin adds as admins).
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub role: Role,
}

/// A change to a group's members, made by one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// Add the user with this role (by an admin); a member already in the group takes the
    /// role (an admin names another admin this way).
    Add(Role),
    /// Remove the user: an admin removes anyone, a member itself (leaves).
    Remove,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0:?} in chat {1:?}")]
    UnknownMessage(String, String),
    #[error("only the receiver of message {0:?} can mark it read")]
    NotReceiver(String),
    /// The user has no message of the chat (it never took part, or the store no longer keeps
    /// any of it): its history is not the user's to read.
    #[error(
        "user {0:?} has no message in chat {1:?} (never took part in it, or the store keeps \
         none of it any more): its history is only for its members"
    )]
    NotMember(String, String),
    #[error("no group {0:?}: create it first (POST /api/groups)")]
    NoSuchGroup(String),
    #[error("group {0:?} exists already: pick another id, or ask its admins to add you")]
    GroupExists(String),
    #[error(
        "group {0:?} would have more than {1} members (store.group_max_members): a larger \
         audience is a channel, which chatd does not have"
    )]
    GroupFull(String, usize),
    #[error("user {0:?} is not a member of group {1:?}")]
    NotInGroup(String, String),
    #[error("user {0:?} is not an admin of group {1:?}: only its admins add and remove others")]
    NotAdmin(String, String),
    #[error(
        "user {0:?} is the last admin of group {1:?}: add another admin before leaving \
         (members remain)"
    )]
    LastAdmin(String, String),
    #[error("message store unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Redis(#[from] crate::redis_client::RedisError),
}

#[async_trait]
pub trait Store: Send + Sync {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError>;
    /// Saves several messages, in the order given, each as [`save`](Self::save) would (its
    /// own outcome, idempotent); a store that can does it in one round trip.
    async fn save_batch(&self, messages: Vec<NewMessage>) -> Vec<Result<SaveOutcome, StoreError>> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            out.push(self.save(m).await);
        }
        out
    }
    /// Marks a message read by its receiver; returns it (its sender is who to tell) with the
    /// receipt's place in the sender's inbox. Marking again changes nothing and returns the
    /// same receipt.
    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Receipt, StoreError>;
    /// Up to `limit` (at most [`MAX_PAGE`]) entries of `user_id`'s inbox after seq `after`.
    /// `limit` 0 answers only `oldest` and `latest`.
    async fn fetch(&self, user_id: &str, after: u64, limit: usize)
        -> Result<InboxPage, StoreError>;
    /// The newest seq of each user's inbox (0 before its first entry), in the order asked;
    /// one round trip where the store can. A node compares its devices' cursors with these
    /// (at their heartbeats) and fetches an inbox only for a device that is behind.
    async fn latest_seqs(&self, user_ids: &[&str]) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::with_capacity(user_ids.len());
        for u in user_ids {
            out.push(self.fetch(u, 0, 0).await?.latest);
        }
        Ok(out)
    }
    /// Up to `limit` (at most [`MAX_HISTORY_PAGE`]) of the messages `user_id` sent or
    /// received in chat `chat_id`, newest first: the newest when `before` is `None`, else
    /// those older than message `before` of that chat. [`StoreError::NotMember`] when the user
    /// has no message of the chat; [`StoreError::UnknownMessage`] when `before` is none of
    /// the user's messages in it.
    async fn fetch_chat(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ChatPage, StoreError>;
    /// Makes group `group_id` with `creator` as its admin and `members` (the creator among
    /// them or not) as members; [`StoreError::GroupExists`] when the id is taken,
    /// [`StoreError::GroupFull`] over the store's cap. Answers the members.
    async fn create_group(
        &self,
        group_id: &str,
        creator: &str,
        members: &[String],
    ) -> Result<Vec<Member>, StoreError>;
    /// Changes one member of a group, as user `by` (see [`MemberChange`]); answers the
    /// members after it. The last admin cannot leave while others remain; the last member
    /// leaving ends the group.
    async fn change_member(
        &self,
        group_id: &str,
        by: &str,
        user_id: &str,
        change: MemberChange,
    ) -> Result<Vec<Member>, StoreError>;
    /// The members of a group, for one of them (`asking`); [`StoreError::NotMember`] for
    /// anyone else.
    async fn members(&self, group_id: &str, asking: &str) -> Result<Vec<Member>, StoreError>;
    async fn health(&self) -> Result<(), StoreError>;
    fn name(&self) -> &'static str;
}

/// Checks a new group's member list against the cap: the creator and the members, each once.
pub fn group_roster(
    group_id: &str,
    creator: &str,
    members: &[String],
    max: usize,
) -> Result<Vec<Member>, StoreError> {
    let mut roster = vec![Member {
        user_id: creator.to_string(),
        role: Role::Admin,
    }];
    for m in members {
        if !roster.iter().any(|r| r.user_id == *m) {
            roster.push(Member {
                user_id: m.clone(),
                role: Role::Member,
            });
        }
    }
    if roster.len() > max {
        return Err(StoreError::GroupFull(group_id.to_string(), max));
    }
    Ok(roster)
}

/// Who receives a message from `sender` to a group of `members`: every member but the
/// sender, who must be one.
pub fn group_receivers(
    group_id: &str,
    sender: &str,
    members: &[Member],
) -> Result<Vec<String>, StoreError> {
    if !members.iter().any(|m| m.user_id == sender) {
        return Err(StoreError::NotInGroup(sender.into(), group_id.into()));
    }
    Ok(members
        .iter()
        .filter(|m| m.user_id != sender)
        .map(|m| m.user_id.clone())
        .collect())
}

/// Applies `change` by `by` to a group's `members` (the rules of [`MemberChange`]), as every
/// store does: the in-process store here, the Redis store in its script (`GROUP_CHANGE`).
pub fn apply_change(
    group_id: &str,
    members: &mut Vec<Member>,
    by: &str,
    user_id: &str,
    change: MemberChange,
    max: usize,
) -> Result<(), StoreError> {
    let role_of = |u: &str| members.iter().find(|m| m.user_id == u).map(|m| m.role);
    let Some(by_role) = role_of(by) else {
        return Err(StoreError::NotInGroup(by.into(), group_id.into()));
    };
    if by_role != Role::Admin && !(change == MemberChange::Remove && by == user_id) {
        return Err(StoreError::NotAdmin(by.into(), group_id.into()));
    }
    let admins = members.iter().filter(|m| m.role == Role::Admin).count();
    let was = role_of(user_id);
    // The last admin may not step down or leave while others remain: nobody could manage
    // the group after it.
    let last_admin = was == Some(Role::Admin) && admins == 1 && members.len() > 1;
    match change {
        MemberChange::Add(role) => {
            let full = members.len() >= max;
            match members.iter_mut().find(|m| m.user_id == user_id) {
                Some(_) if last_admin && role != Role::Admin => {
                    return Err(StoreError::LastAdmin(user_id.into(), group_id.into()))
                }
                Some(m) => m.role = role,
                None if full => return Err(StoreError::GroupFull(group_id.into(), max)),
                None => members.push(Member {
                    user_id: user_id.into(),
                    role,
                }),
            }
        }
        MemberChange::Remove => {
            if was.is_none() {
                return Err(StoreError::NotInGroup(user_id.into(), group_id.into()));
            }
            if last_admin {
                return Err(StoreError::LastAdmin(user_id.into(), group_id.into()));
            }
            members.retain(|m| m.user_id != user_id);
        }
    }
    Ok(())
}
