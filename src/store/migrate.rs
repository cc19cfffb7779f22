//! Moves a single Redis from the key layout of chatd before Redis Cluster support (keys named
//! `chat:msg:{id}`, `chat:seq:{user}`, ...) to the hash-tagged one of [`super::redis`]
//! (`chat:{user}:...`), keeping every message, seq and idempotency key with its expiry:
//! `chatd store migrate`, run once with every node and MessageService stopped. A node or
//! MessageService that finds old keys and no [`LAYOUT`] marker refuses to start and says so,
//! rather than serve inboxes that look empty and give seqs again from 1.
//!
//! The scripts derive the keys they write from what they read (the sender of a message), so
//! they run on a single Redis only; the old layout never ran on a cluster.

use redis::Script;

use crate::redis_client::{query_script_pipe, RedisClient, RedisError};

/// Set once the store's keys are in the current layout: `2`.
pub const LAYOUT: &str = "chat:layout";
const CURRENT: &str = "2";

/// Patterns of the old layout's keys, in the order they are moved: idempotency keys first
/// (each needs its message's old key to learn the sender), then messages, then each user's
/// seq and inbox; old presence hashes are dropped (nodes register their devices again).
const OLD: [(&str, &str); 5] = [
    ("chat:msg:idem:*", IDEM),
    ("chat:msg:*", MESSAGE),
    ("chat:seq:*", SEQ),
    ("chat:inbox:*", INBOX),
    ("chat:user:devices:*", DROP),
];

/// KEYS[1] `chat:msg:idem:{sender}:{temp}`. The sender comes from the message it names (a
/// user id may hold ':'); one whose message expired is useless and dropped.
const IDEM: &str = r#"
local id = redis.call('GET', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
local sender = id and redis.call('HGET', 'chat:msg:' .. id, 'senderId')
if sender then
  local prefix = 'chat:msg:idem:' .. sender .. ':'
  if string.sub(KEYS[1], 1, #prefix) == prefix then
    local key = 'chat:{' .. sender .. '}:idem:' .. string.sub(KEYS[1], #prefix + 1)
    redis.call('SET', key, id)
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  end
end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS[1] `chat:msg:{id}`: a copy for the sender (every field, as the save's last step writes
/// it) and one for the receiver (without the sender's `senderSeq` and `receiptSeq`, but for a
/// note to self), with the old key's expiry.
const MESSAGE: &str = r#"
if string.sub(KEYS[1], 1, 14) == 'chat:msg:idem:' then return 0 end
local all = redis.call('HGETALL', KEYS[1])
if #all == 0 then return 0 end
local f = {}
for i = 1, #all, 2 do f[all[i]] = all[i + 1] end
local id = string.sub(KEYS[1], 10)
local ttl = redis.call('PTTL', KEYS[1])
local function copy(user, skip)
  local key = 'chat:{' .. user .. '}:msg:' .. id
  for i = 1, #all, 2 do
    if not skip[all[i]] then redis.call('HSET', key, all[i], all[i + 1]) end
  end
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
end
copy(f.senderId, {})
if f.senderId ~= f.receiverId then
  copy(f.receiverId, {senderSeq = true, receiptSeq = true})
end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS[1] `chat:seq:{user}`: the new counter is the larger of both (seqs never repeat).
const SEQ: &str = r#"
local user = string.sub(KEYS[1], 10)
local key = 'chat:{' .. user .. '}:seq'
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(redis.call('GET', key) or '0')
if old > new then redis.call('SET', key, old) end
redis.call('DEL', KEYS[1])
return 1
"#;

/// KEYS[1] `chat:inbox:{user}`: merged into the new inbox (members are unchanged).
const INBOX: &str = r#"
local user = string.sub(KEYS[1], 12)
local key = 'chat:{' .. user .. '}:inbox'
local ttl = redis.call('PTTL', KEYS[1])
redis.call('ZUNIONSTORE', key, 2, key, KEYS[1], 'AGGREGATE', 'MAX')
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
redis.call('DEL', KEYS[1])
return 1
"#;

const DROP: &str = r#"
return redis.call('DEL', KEYS[1])
"#;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "this Redis holds chatd data in the layout before Redis Cluster support ({0} and more): \
         stop every node and MessageService, run `chatd store migrate` once, then start them \
         (README, \"Upgrading\")"
    )]
    Old(String),
    #[error("`chatd store migrate` moves a single Redis; the old layout never ran on a cluster")]
    Cluster,
    #[error(transparent)]
    Redis(#[from] RedisError),
}

/// Keys of the old layout matching `pattern`, a page at a time from `cursor`.
async fn scan(
    redis: &RedisClient,
    cursor: u64,
    pattern: &str,
) -> Result<(u64, Vec<String>), RedisError> {
    redis
        .call("scan", |mut c| async move {
            redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
        })
        .await
}

/// Some key of the old layout, if there is one.
async fn old_key(redis: &RedisClient) -> Result<Option<String>, RedisError> {
    for (pattern, _) in OLD {
        let mut cursor = 0;
        loop {
            let (next, keys) = scan(redis, cursor, pattern).await?;
            if let Some(k) = keys.into_iter().next() {
                return Ok(Some(k));
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(None)
}

/// At start-up of a node or MessageService on a Redis store: fine when the marker is there
/// (or on a cluster); else the keys are scanned once, and old ones stop start-up. A Redis
/// without any sets the marker, so the scan happens once.
pub async fn check_layout(redis: &RedisClient) -> Result<(), LayoutError> {
    if redis.is_cluster() {
        return Ok(());
    }
    let marker: Option<String> = redis
        .call("layout", |mut c| async move {
            redis::cmd("GET").arg(LAYOUT).query_async(&mut c).await
        })
        .await?;
    if marker.as_deref() == Some(CURRENT) {
        return Ok(());
    }
    if let Some(k) = old_key(redis).await? {
        return Err(LayoutError::Old(k));
    }
    set_marker(redis).await?;
    Ok(())
}

/// [`check_layout`] at the start of a node or MessageService: old keys stop it; a Redis that
/// does not answer yet is only a warning (it is checked again at the next start).
pub async fn check_at_start(redis: &RedisClient) -> Result<(), LayoutError> {
    match check_layout(redis).await {
        Err(LayoutError::Redis(e)) => {
            tracing::warn!("could not check the Redis store's key layout: {e}");
            Ok(())
        }
        other => other,
    }
}

async fn set_marker(redis: &RedisClient) -> Result<(), RedisError> {
    redis
        .call("layout", |mut c| async move {
            redis::cmd("SET")
                .arg(LAYOUT)
                .arg(CURRENT)
                .query_async::<()>(&mut c)
                .await
        })
        .await
}

/// Moves every key of the old layout; returns how many of each pattern. Safe to run again
/// (what is moved is gone from the old names) and to interrupt (run it again).
pub async fn migrate(redis: &RedisClient) -> Result<Vec<(&'static str, u64)>, LayoutError> {
    if redis.is_cluster() {
        return Err(LayoutError::Cluster);
    }
    let mut moved = Vec::new();
    for (pattern, body) in OLD {
        let script = Script::new(body);
        let mut count = 0;
        // Keys are renamed as they are found; SCAN still visits every key that existed when
        // it began (and may return one twice: the scripts answer 0 for a key already gone).
        let mut cursor = 0;
        loop {
            let (next, keys) = scan(redis, cursor, pattern).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.invoke_script(&script.key(k));
                }
                let (pipe, script) = (&pipe, &script);
                let done: Vec<u64> = redis
                    .call("migrate", |mut c| async move {
                        query_script_pipe(&mut c, pipe, script).await
                    })
                    .await?;
                count += done.iter().sum::<u64>();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        moved.push((pattern, count));
    }
    set_marker(redis).await?;
    Ok(moved)
}
