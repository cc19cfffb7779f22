//! A store in Redis, shared by every node (`store.url = "redis"`): a read receipt sent on one
//! node finds the message stored by another. Save is one Lua script, idempotent on sender +
//! `tempMessageId`. Messages expire after `store.retention_secs`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chat:msg:{messageId}` | hash | `senderId`, `receiverId`, `chatId`, `content`, `timestamp`, `tempMessageId`, `readAt` |
//! | `chat:msg:idem:{senderId}:{tempMessageId}` | string | the `messageId` stored for that send |

use std::collections::HashMap;

use async_trait::async_trait;
use deadpool_redis::redis::{self, Script};

use super::{NewMessage, SaveOutcome, Store, StoreError, StoredMessage};
use crate::chat::ids::now_ms;
use crate::redis_client::RedisClient;

const MSG_PREFIX: &str = "chat:msg:";

pub fn message_key(message_id: &str) -> String {
    format!("{MSG_PREFIX}{message_id}")
}

pub fn idempotency_key(sender_id: &str, temp_message_id: &str) -> String {
    format!("{MSG_PREFIX}idem:{sender_id}:{temp_message_id}")
}

/// KEYS: message, idempotency (ignored when ARGV[7] is empty). Returns the id of the message
/// stored before under the same id or idempotency key, or "" when this one was stored.
const SAVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return ARGV[1] end
if ARGV[7] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing and redis.call('EXISTS', ARGV[9] .. existing) == 1 then return existing end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[8])
end
redis.call('HSET', KEYS[1], 'senderId', ARGV[2], 'receiverId', ARGV[3], 'chatId', ARGV[4],
  'content', ARGV[5], 'timestamp', ARGV[6], 'tempMessageId', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return ''
"#;

/// KEYS: message. ARGV: chatId, reader, now. Returns {status, field, value, ...}.
const MARK_READ: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'chatId', 'receiverId', 'readAt')
if not m[1] or m[1] ~= ARGV[1] then return {'unknown'} end
if m[2] ~= ARGV[2] then return {'forbidden'} end
if not m[3] then redis.call('HSET', KEYS[1], 'readAt', ARGV[3]) end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, 'ok')
return all
"#;

pub struct RedisStore {
    redis: RedisClient,
    retention_ms: u64,
    save: Script,
    mark_read: Script,
}

impl RedisStore {
    pub fn new(redis: RedisClient, retention_secs: u64) -> Self {
        Self {
            redis,
            retention_ms: retention_secs.saturating_mul(1000),
            save: Script::new(SAVE),
            mark_read: Script::new(MARK_READ),
        }
    }

    async fn load(&self, message_id: &str) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(message_id);
        let fields: HashMap<String, String> = self
            .redis
            .call("load message", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await
            .map_err(StoreError::Unavailable)?;
        Ok(from_fields(message_id, &fields))
    }
}

fn from_fields(message_id: &str, f: &HashMap<String, String>) -> Option<StoredMessage> {
    let get = |k: &str| f.get(k).cloned();
    Some(StoredMessage {
        message: NewMessage {
            message_id: message_id.to_string(),
            sender_id: get("senderId")?,
            receiver_id: get("receiverId")?,
            chat_id: get("chatId")?,
            content: get("content")?,
            timestamp: get("timestamp")?.parse().ok()?,
            temp_message_id: get("tempMessageId").filter(|t| !t.is_empty()),
        },
        read_at: get("readAt").and_then(|r| r.parse().ok()),
    })
}

#[async_trait]
impl Store for RedisStore {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        let temp = message.temp_message_id.clone().unwrap_or_default();
        let m = &message;
        let script = &self.save;
        let retention = self.retention_ms;
        let existing: String = self
            .redis
            .call("save message", |mut c| async move {
                script
                    .key(message_key(&m.message_id))
                    .key(idempotency_key(&m.sender_id, &temp))
                    .arg(&m.message_id)
                    .arg(&m.sender_id)
                    .arg(&m.receiver_id)
                    .arg(&m.chat_id)
                    .arg(&m.content)
                    .arg(m.timestamp)
                    .arg(&temp)
                    .arg(retention)
                    .arg(MSG_PREFIX)
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(StoreError::Unavailable)?;
        if existing.is_empty() {
            return Ok(SaveOutcome::Saved(StoredMessage {
                message,
                read_at: None,
            }));
        }
        match self.load(&existing).await? {
            Some(earlier) => Ok(SaveOutcome::Duplicate(earlier)),
            // Expired between the two calls: extremely unlikely; store this one instead.
            None => Ok(SaveOutcome::Saved(StoredMessage {
                message,
                read_at: None,
            })),
        }
    }

    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<StoredMessage, StoreError> {
        let script = &self.mark_read;
        let reply: Vec<String> = self
            .redis
            .call("mark read", |mut c| async move {
                script
                    .key(message_key(message_id))
                    .arg(chat_id)
                    .arg(reader_id)
                    .arg(now_ms())
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(StoreError::Unavailable)?;
        let unknown = || StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string());
        match reply.first().map(String::as_str) {
            Some("ok") => {
                let fields: HashMap<String, String> = reply[1..]
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                from_fields(message_id, &fields).ok_or_else(unknown)
            }
            Some("forbidden") => Err(StoreError::NotReceiver(message_id.to_string())),
            _ => Err(unknown()),
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.redis.ping().await.map_err(StoreError::Unavailable)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
