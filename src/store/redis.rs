//! A store in Redis, shared by every node (`store.url = "redis://..."`, or `chatd
//! message-service --backend redis`): a read receipt sent on one node finds the message stored
//! by another, and a device finds its inbox whichever node it reconnects to. Saving (a batch of
//! messages per call) and mark-read are Lua scripts, so a message and its places in the
//! inboxes are stored together (a seq that exists always has its message). Messages expire after `store.retention_secs`;
//! an inbox keeps at most `store.inbox_max_entries` entries.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chat:msg:{messageId}` | hash | `senderId`, `receiverId`, `chatId`, `content`, `timestamp`, `tempMessageId`, `receiverSeq`, `senderSeq`, and once read `readAt`, `receiptSeq` |
//! | `chat:msg:idem:{senderId}:{tempMessageId}` | string | the `messageId` stored for that send |
//! | `chat:seq:{userId}` | string | the user's latest inbox seq (never expires: seqs never repeat) |
//! | `chat:inbox:{userId}` | sorted set | score = seq, member = `{seq}:m:{messageId}` (a message) or `{seq}:r:{messageId}` (a read receipt for a message the user sent) |

use std::collections::HashMap;

use async_trait::async_trait;
use redis::Script;

use super::{
    EntryKind, InboxEntry, InboxPage, NewMessage, Receipt, SaveOutcome, Store, StoreError,
    StoredMessage, MAX_PAGE,
};
use crate::chat::ids::now_ms;
use crate::redis_client::{RedisClient, RedisError};

const MSG_PREFIX: &str = "chat:msg:";
const SEQ_PREFIX: &str = "chat:seq:";
const INBOX_PREFIX: &str = "chat:inbox:";

pub fn message_key(message_id: &str) -> String {
    format!("{MSG_PREFIX}{message_id}")
}

pub fn idempotency_key(sender_id: &str, temp_message_id: &str) -> String {
    format!("{MSG_PREFIX}idem:{sender_id}:{temp_message_id}")
}

pub fn seq_key(user_id: &str) -> String {
    format!("{SEQ_PREFIX}{user_id}")
}

pub fn inbox_key(user_id: &str) -> String {
    format!("{INBOX_PREFIX}{user_id}")
}

/// Gives a message the next place in one user's inbox: (counter, inbox, kind, messageId,
/// retention ms, max entries) -> seq.
const PLACE: &str = r#"
local function place(counter, inbox, kind, id, retention, max)
  local seq = redis.call('INCR', counter)
  redis.call('ZADD', inbox, seq, seq .. ':' .. kind .. ':' .. id)
  local n = redis.call('ZCARD', inbox)
  if n > max then redis.call('ZREMRANGEBYRANK', inbox, 0, n - max - 1) end
  redis.call('PEXPIRE', inbox, retention)
  return seq
end
"#;

/// Saves a batch of messages, in order, in one script call: under `appendfsync always` Redis
/// writes and fsyncs its log once per command it completes, so one call for the batch costs
/// Redis less per message than one call per message pipelined (`chatd bench --cluster`, the
/// README's cross-node table). Each message is stored exactly as alone would be.
///
/// KEYS, six per message: message, idempotency (ignored when its tempMessageId is empty),
/// receiver's counter and inbox, sender's counter and inbox. ARGV: retention ms, message key
/// prefix, max inbox entries, then seven per message: messageId, senderId, receiverId,
/// chatId, content, timestamp, tempMessageId. Returns, per message, {id of the message
/// stored before under the same id or idempotency key} or {'', receiverSeq, senderSeq}.
const SAVE: &str = r#"
local retention, prefix, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function save(k, a)
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then return {ARGV[a + 1]} end
  local temp = ARGV[a + 7]
  if temp ~= '' then
    local existing = redis.call('GET', KEYS[k + 2])
    if existing and redis.call('EXISTS', prefix .. existing) == 1 then return {existing} end
    redis.call('SET', KEYS[k + 2], ARGV[a + 1], 'PX', retention)
  end
  local rseq = place(KEYS[k + 3], KEYS[k + 4], 'm', ARGV[a + 1], retention, max)
  local sseq = rseq
  if ARGV[a + 2] ~= ARGV[a + 3] then
    sseq = place(KEYS[k + 5], KEYS[k + 6], 'm', ARGV[a + 1], retention, max)
  end
  redis.call('HSET', KEYS[k + 1], 'senderId', ARGV[a + 2], 'receiverId', ARGV[a + 3],
    'chatId', ARGV[a + 4], 'content', ARGV[a + 5], 'timestamp', ARGV[a + 6],
    'tempMessageId', temp, 'receiverSeq', rseq, 'senderSeq', sseq)
  redis.call('PEXPIRE', KEYS[k + 1], retention)
  return {'', tostring(rseq), tostring(sseq)}
end
local out = {}
for i = 0, #KEYS / 6 - 1 do
  out[i + 1] = save(i * 6, 3 + i * 7)
end
return out
"#;

/// Most messages one save script call stores: Redis runs nothing else meanwhile (256 take it
/// about 10 ms). A larger batch is several calls in one pipeline.
const SAVE_CHUNK: usize = 256;

/// KEYS: message. ARGV: chatId, reader, now, messageId, counter prefix, inbox prefix,
/// retention ms, max entries. The first mark gives the receipt a place in the sender's inbox
/// (keys named from the stored sender, so single Redis only). Returns {status, field, value, ...}.
const MARK_READ: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'chatId', 'receiverId', 'readAt', 'senderId')
if not m[1] or m[1] ~= ARGV[1] then return {'unknown'} end
if m[2] ~= ARGV[2] then return {'forbidden'} end
if not m[3] then
  local seq = place(ARGV[5] .. m[4], ARGV[6] .. m[4], 'r', ARGV[4], ARGV[7], tonumber(ARGV[8]))
  redis.call('HSET', KEYS[1], 'readAt', ARGV[3], 'receiptSeq', seq)
end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, 'ok')
return all
"#;

/// KEYS: counter, inbox. ARGV: after, limit, message prefix. Entries whose message expired
/// are dropped from the front first, so `oldest` is what can still be given.
/// Returns {{oldest, latest}, {seq, kind, messageId, field, value, ...}, ...}.
const FETCH: &str = r#"
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
local oldest = latest + 1
while true do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #first == 0 then break end
  local id = string.match(first[1], '^%d+:%a:(.*)$')
  if redis.call('EXISTS', ARGV[3] .. id) == 1 then
    oldest = tonumber(first[2])
    break
  end
  redis.call('ZREM', KEYS[2], first[1])
end
local out = {{tostring(oldest), tostring(latest)}}
if tonumber(ARGV[2]) > 0 then
  local members = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
  for _, member in ipairs(members) do
    local seq, kind, id = string.match(member, '^(%d+):(%a):(.*)$')
    local entry = {seq, kind, id}
    for _, v in ipairs(redis.call('HGETALL', ARGV[3] .. id)) do table.insert(entry, v) end
    table.insert(out, entry)
  end
end
return out
"#;

pub struct RedisStore {
    redis: RedisClient,
    retention_ms: u64,
    inbox_max_entries: usize,
    save: Script,
    mark_read: Script,
    fetch: Script,
}

impl RedisStore {
    pub fn new(redis: RedisClient, retention_secs: u64, inbox_max_entries: usize) -> Self {
        Self {
            redis,
            retention_ms: retention_secs.saturating_mul(1000),
            inbox_max_entries: inbox_max_entries.max(1),
            save: Script::new(&format!("{PLACE}{SAVE}")),
            mark_read: Script::new(&format!("{PLACE}{MARK_READ}")),
            fetch: Script::new(FETCH),
        }
    }

    async fn load(&self, message_id: &str) -> Result<Option<StoredMessage>, StoreError> {
        let key = message_key(message_id);
        let fields: HashMap<String, String> = self
            .redis
            .call("load message", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(from_fields(message_id, &fields))
    }
}

/// The same failure for each of `n` saves.
fn failed_all(n: usize, why: &str) -> Vec<Result<SaveOutcome, StoreError>> {
    (0..n)
        .map(|_| Err(StoreError::Unavailable(why.to_string())))
        .collect()
}

fn from_fields(message_id: &str, f: &HashMap<String, String>) -> Option<StoredMessage> {
    let get = |k: &str| f.get(k).cloned();
    let seq = |k: &str| get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(StoredMessage {
        receiver_seq: seq("receiverSeq"),
        sender_seq: seq("senderSeq"),
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

impl RedisStore {
    /// The save script's call for `messages`, in order.
    fn save_invocation<'a>(&'a self, messages: &[NewMessage]) -> redis::ScriptInvocation<'a> {
        let mut call = self.save.prepare_invoke();
        call.arg(self.retention_ms)
            .arg(MSG_PREFIX)
            .arg(self.inbox_max_entries);
        for m in messages {
            let temp = m.temp_message_id.as_deref().unwrap_or_default();
            call.key(message_key(&m.message_id))
                .key(idempotency_key(&m.sender_id, temp))
                .key(seq_key(&m.receiver_id))
                .key(inbox_key(&m.receiver_id))
                .key(seq_key(&m.sender_id))
                .key(inbox_key(&m.sender_id))
                .arg(&m.message_id)
                .arg(&m.sender_id)
                .arg(&m.receiver_id)
                .arg(&m.chat_id)
                .arg(&m.content)
                .arg(m.timestamp)
                .arg(temp);
        }
        call
    }

    /// What the save script's `reply` for `message` means.
    async fn save_outcome(
        &self,
        message: NewMessage,
        reply: Vec<String>,
    ) -> Result<SaveOutcome, StoreError> {
        let bad_reply = || StoreError::Unavailable(format!("save script answered {reply:?}"));
        match reply.as_slice() {
            [empty, rseq, sseq] if empty.is_empty() => Ok(SaveOutcome::Saved(StoredMessage {
                receiver_seq: rseq.parse().map_err(|_| bad_reply())?,
                sender_seq: sseq.parse().map_err(|_| bad_reply())?,
                ..StoredMessage::unsequenced(message)
            })),
            [existing] => match self.load(existing).await? {
                Some(earlier) => Ok(SaveOutcome::Duplicate(earlier)),
                // The earlier one expired between the two calls; it cannot be re-acked.
                None => Err(StoreError::Unavailable(format!(
                    "message {existing} expired while being read; retry"
                ))),
            },
            _ => Err(bad_reply()),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        let mut outcome = self.save_batch(vec![message]).await;
        outcome.pop().unwrap_or_else(|| {
            Err(StoreError::Unavailable(
                "the save script answered nothing".into(),
            ))
        })
    }

    /// One pipeline of save script calls ([`SAVE_CHUNK`] messages each), one round trip, in
    /// order: each message is stored as alone, one after another as they were given.
    async fn save_batch(&self, messages: Vec<NewMessage>) -> Vec<Result<SaveOutcome, StoreError>> {
        let mut pipe = redis::pipe();
        for chunk in messages.chunks(SAVE_CHUNK) {
            pipe.invoke_script(&self.save_invocation(chunk));
        }
        let script = &self.save;
        let pipe = &pipe;
        let replies: Result<Vec<Vec<Vec<String>>>, RedisError> = self
            .redis
            .call("save messages", |mut c| async move {
                crate::redis_client::query_script_pipe(&mut c, pipe, script).await
            })
            .await;
        let replies: Vec<Vec<String>> = match replies {
            Ok(r) => r.into_iter().flatten().collect(),
            Err(why) => return failed_all(messages.len(), &why.to_string()),
        };
        if replies.len() != messages.len() {
            let why = format!("{} answers to {} saves", replies.len(), messages.len());
            return failed_all(messages.len(), &why);
        }
        let mut out = Vec::with_capacity(messages.len());
        for (m, reply) in messages.into_iter().zip(replies) {
            out.push(self.save_outcome(m, reply).await);
        }
        out
    }

    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Receipt, StoreError> {
        let script = &self.mark_read;
        let (retention, max) = (self.retention_ms, self.inbox_max_entries);
        let reply: Vec<String> = self
            .redis
            .call("mark read", |mut c| async move {
                script
                    .key(message_key(message_id))
                    .arg(chat_id)
                    .arg(reader_id)
                    .arg(now_ms())
                    .arg(message_id)
                    .arg(SEQ_PREFIX)
                    .arg(INBOX_PREFIX)
                    .arg(retention)
                    .arg(max)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let unknown = || StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string());
        match reply.first().map(String::as_str) {
            Some("ok") => {
                let fields: HashMap<String, String> = reply[1..]
                    .chunks_exact(2)
                    .map(|p| (p[0].clone(), p[1].clone()))
                    .collect();
                let seq = fields.get("receiptSeq").and_then(|s| s.parse().ok());
                let message = from_fields(message_id, &fields).ok_or_else(unknown)?;
                Ok(Receipt {
                    message,
                    seq: seq.unwrap_or(0),
                })
            }
            Some("forbidden") => Err(StoreError::NotReceiver(message_id.to_string())),
            _ => Err(unknown()),
        }
    }

    async fn fetch(
        &self,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let script = &self.fetch;
        let reply: Vec<Vec<String>> = self
            .redis
            .call("fetch inbox", |mut c| async move {
                script
                    .key(seq_key(user_id))
                    .key(inbox_key(user_id))
                    .arg(after)
                    .arg(limit.min(MAX_PAGE))
                    .arg(MSG_PREFIX)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let bad = || StoreError::Unavailable("fetch script answered an unreadable reply".into());
        let (head, rows) = reply.split_first().ok_or_else(bad)?;
        let [oldest, latest] = head.as_slice() else {
            return Err(bad());
        };
        let mut page = InboxPage {
            entries: Vec::with_capacity(rows.len()),
            oldest: oldest.parse().map_err(|_| bad())?,
            latest: latest.parse().map_err(|_| bad())?,
        };
        for row in rows {
            let [seq, kind, id, fields @ ..] = row.as_slice() else {
                return Err(bad());
            };
            let fields: HashMap<String, String> = fields
                .chunks_exact(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect();
            let Some(message) = from_fields(id, &fields) else {
                // Expired after an older entry that has not: the oldest still kept moves on.
                tracing::warn!(user = user_id, seq = %seq, "inbox entry whose message expired");
                continue;
            };
            page.entries.push(InboxEntry {
                seq: seq.parse().map_err(|_| bad())?,
                kind: if kind == "r" {
                    EntryKind::Receipt
                } else {
                    EntryKind::Message
                },
                message,
            });
        }
        Ok(page)
    }

    /// One `MGET` of the users' seq counters (a counter only grows with its inbox entry).
    async fn latest_seqs(&self, user_ids: &[&str]) -> Result<Vec<u64>, StoreError> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = user_ids.iter().map(|u| seq_key(u)).collect();
        let keys = &keys;
        let seqs: Vec<Option<u64>> = self
            .redis
            .call("latest seqs", |mut c| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut c).await
            })
            .await?;
        Ok(seqs.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(self.redis.ping().await?)
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
