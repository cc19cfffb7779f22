//! Presence in Redis, shared by every node of a cluster. A user's devices are one hash,
//! updated atomically; every call has a deadline, so a Redis that stalls or dies costs a
//! session a timeout error, never a hang.
//!
//! Key layout (documented in the README for `redis-cli`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chat:{userId}:devices` | hash | connectionId -> `{nodeId}\|{lastSeenMs}`; expires `ttl` after the last update |
//! | `chat:online:users` | set | user ids with at least one device (the seed's key) |
//! | `chat:node:devices:{nodeId}` | set | `{userId}\|{connectionId}` of that node, to clear it in one go |
//! | `chat:node:lease:{nodeId}` | string | the node's REST URL; expires `node_lease_secs` after the last refresh |
//! | `chat:nodes` | set | node ids ever seen alive and not yet cleaned up |
//!
//! The devices hash carries the user's hash tag (its slot on a Redis Cluster is the user's);
//! the other keys are indexes in slots of their own. An update of a device and of the
//! indexes is one transaction on a single Redis and one per slot on a cluster, so on a
//! cluster `chat:online:users` can briefly miss a user whose device a concurrent disconnect
//! was removing: every node's refresh of its devices (every third of `presence.ttl_secs`)
//! adds its users back. Routing reads only the devices hash.
//!
//! A device counts only while its node's lease exists, so the users of a node killed with
//! SIGKILL read as offline once its lease lapses; the next janitor pass on any live node then
//! removes them for good. Leases found alive are remembered for [`LEASE_VIEW`]: a lookup
//! costs no lease read, and a node found dead is read again at every lookup.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::{Device, Presence, PresenceError};
use crate::chat::ids::now_ms;
use crate::redis_client::{slot, RedisClient, RedisError};

pub const ONLINE_USERS: &str = "chat:online:users";
pub const NODES: &str = "chat:nodes";
const NODE_DEVICES_PREFIX: &str = "chat:node:devices:";
const LEASE_PREFIX: &str = "chat:node:lease:";

/// How long a lease found alive is taken as alive without reading it again.
pub const LEASE_VIEW: Duration = Duration::from_secs(1);

pub fn devices_key(user_id: &str) -> String {
    format!("chat:{{{user_id}}}:devices")
}

pub fn node_devices_key(node_id: &str) -> String {
    format!("{NODE_DEVICES_PREFIX}{node_id}")
}

pub fn lease_key(node_id: &str) -> String {
    format!("{LEASE_PREFIX}{node_id}")
}

/// Removes a device from its user's hash: KEYS[1] the hash, ARGV[1] the connection id.
/// Returns {node the device was on, or '', devices left}.
const DISCONNECT: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
local node = ''
if v then
  node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return {node, redis.call('HLEN', KEYS[1])}
"#;

/// Refreshes devices' last-seen time, keeping their node: ARGV now, ttl ms, then per device
/// its hash (KEYS) and connection id (ARGV). Answers per device 1, or 0 when the hash does not
/// know it (Redis lost it, or the janitor reaped it): the node registers it again.
const REFRESH: &str = r#"
local out = {}
for k = 1, #KEYS do
  local conn = ARGV[k + 2]
  local v = redis.call('HGET', KEYS[k], conn)
  if v then
    local node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
    redis.call('HSET', KEYS[k], conn, node .. '|' .. ARGV[1])
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
    out[k] = 1
  else
    out[k] = 0
  end
end
return out
"#;

/// The devices of each user in KEYS (each a device hash): per key a flat [conn, value, ...].
const DEVICES: &str = r#"
local out = {}
for k = 1, #KEYS do out[k] = redis.call('HGETALL', KEYS[k]) end
return out
"#;

/// Removes a node's devices from their users' hashes: ARGV[1] the node, then per device its
/// user's hash (KEYS) and connection id (ARGV); a device that moved to another node since
/// stays. Answers per device 1 when its user has no device left, else 0.
const CLEAR_DEVICES: &str = r#"
local out = {}
for k = 1, #KEYS do
  local conn = ARGV[k + 1]
  local v = redis.call('HGET', KEYS[k], conn)
  if v and string.sub(v, 1, string.find(v, '|', 1, true) - 1) == ARGV[1] then
    redis.call('HDEL', KEYS[k], conn)
  end
  out[k] = redis.call('HLEN', KEYS[k]) == 0 and 1 or 0
end
return out
"#;

pub struct RedisPresence {
    redis: RedisClient,
    ttl_ms: i64,
    lease: Duration,
    disconnect: Script,
    refresh: Script,
    devices: Script,
    clear_devices: Script,
    /// Nodes whose lease was found alive, and since when (cleared every [`LEASE_VIEW`]).
    live: std::sync::Mutex<(Instant, HashSet<String>)>,
}

impl RedisPresence {
    pub fn new(redis: RedisClient, ttl_secs: u64, lease_secs: u64) -> Self {
        Self {
            redis,
            ttl_ms: (ttl_secs as i64).saturating_mul(1000),
            lease: Duration::from_secs(lease_secs),
            disconnect: Script::new(DISCONNECT),
            refresh: Script::new(REFRESH),
            devices: Script::new(DEVICES),
            clear_devices: Script::new(CLEAR_DEVICES),
            live: std::sync::Mutex::new((Instant::now(), HashSet::new())),
        }
    }

    /// Presence on the `[redis]` of `config`, with its TTL and lease.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, RedisError> {
        Ok(Self::new(
            RedisClient::new(&config.redis)?,
            config.presence.ttl_secs,
            config.presence.node_lease_secs,
        ))
    }

    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, PresenceError>
    where
        F: FnOnce(crate::redis_client::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.redis.call(what, f).await.map_err(PresenceError::from)
    }

    /// Which of `nodes` hold a lease: those found alive within [`LEASE_VIEW`] without a read,
    /// the others read now (one `MGET`).
    async fn live_among(&self, nodes: HashSet<&str>) -> Result<HashSet<String>, PresenceError> {
        // The lock is never held across the read: lookups do not queue behind one another's
        // round trip to Redis.
        let (mut live, unknown): (HashSet<String>, Vec<&str>) = {
            let mut view = self.live.lock().unwrap_or_else(|e| e.into_inner());
            if view.0.elapsed() >= LEASE_VIEW {
                *view = (Instant::now(), HashSet::new());
            }
            let (known, unknown): (Vec<&str>, Vec<&str>) =
                nodes.iter().copied().partition(|n| view.1.contains(*n));
            (known.into_iter().map(String::from).collect(), unknown)
        };
        if !unknown.is_empty() {
            let keys: Vec<String> = unknown.iter().map(|n| lease_key(n)).collect();
            let keys = &keys;
            let urls: Vec<Option<String>> = self
                .call("leases", |mut c| async move {
                    redis::cmd("MGET").arg(keys).query_async(&mut c).await
                })
                .await?;
            let alive: Vec<String> = unknown
                .into_iter()
                .zip(urls)
                .filter(|(_, url)| url.is_some())
                .map(|(node, _)| node.to_string())
                .collect();
            let mut view = self.live.lock().unwrap_or_else(|e| e.into_inner());
            view.1.extend(alive.iter().cloned());
            live.extend(alive);
        }
        Ok(live)
    }

    /// Devices from flat [conn, `{node}|{lastSeenMs}`, ...] lists, one per user: those of a
    /// node with a lease, the expired ones left out.
    async fn live_devices(
        &self,
        lists: Vec<Vec<String>>,
    ) -> Result<Vec<Vec<Device>>, PresenceError> {
        let now = now_ms();
        let parsed: Vec<Vec<Device>> = lists
            .into_iter()
            .map(|flat| {
                flat.chunks_exact(2)
                    .filter_map(|pair| {
                        let (node, seen) = pair[1].split_once('|')?;
                        let last_seen_ms: i64 = seen.parse().ok()?;
                        (now - last_seen_ms < self.ttl_ms).then(|| Device {
                            connection_id: pair[0].clone(),
                            node_id: node.to_string(),
                            last_seen_ms,
                        })
                    })
                    .collect()
            })
            .collect();
        let nodes: HashSet<&str> = parsed
            .iter()
            .flatten()
            .map(|d| d.node_id.as_str())
            .collect();
        if nodes.is_empty() {
            return Ok(parsed);
        }
        let live = self.live_among(nodes).await?;
        Ok(parsed
            .into_iter()
            .map(|list| {
                list.into_iter()
                    .filter(|d| live.contains(&d.node_id))
                    .collect()
            })
            .collect())
    }

    /// Refreshes this node's lease (with its REST URL as value) and its place in `chat:nodes`.
    /// Returns whether the lease had to be created anew: Redis restarted empty, or the lease
    /// lapsed and a janitor cleared this node's devices.
    pub async fn refresh_lease(&self, node_id: &str, url: &str) -> Result<bool, PresenceError> {
        let lease_ms = self.lease.as_millis() as u64;
        let (key, url) = (lease_key(node_id), url.to_string());
        // SET ... GET answers the value it replaced: none when the lease was gone.
        let before: Option<String> = self
            .call("lease", |mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&url)
                    .arg("PX")
                    .arg(lease_ms)
                    .arg("GET")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        self.call("nodes", |mut c| async move {
            c.sadd::<_, _, ()>(NODES, node_id).await
        })
        .await?;
        Ok(before.is_none())
    }

    /// Every node in `chat:nodes` with its lease's URL (`None` once the lease lapsed): the
    /// janitor runs this on every node every third of a lease.
    async fn known_nodes(&self) -> Result<Vec<(String, Option<String>)>, PresenceError> {
        let nodes: Vec<String> = self
            .call("nodes", |mut c| async move { c.smembers(NODES).await })
            .await?;
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = nodes.iter().map(|n| lease_key(n)).collect();
        let keys = &keys;
        let urls: Vec<Option<String>> = self
            .call("leases", |mut c| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut c).await
            })
            .await?;
        Ok(nodes.into_iter().zip(urls).collect())
    }

    /// Live nodes and their REST URLs.
    pub async fn live_nodes(&self) -> Result<Vec<(String, String)>, PresenceError> {
        let mut live: Vec<(String, String)> = self
            .known_nodes()
            .await?
            .into_iter()
            .filter_map(|(node, url)| url.map(|u| (node, u)))
            .collect();
        live.sort();
        Ok(live)
    }

    /// Clears the devices of every node whose lease lapsed; returns the nodes cleared.
    pub async fn reap_dead_nodes(&self) -> Result<Vec<String>, PresenceError> {
        let mut reaped = Vec::new();
        for (node, url) in self.known_nodes().await? {
            if url.is_none() {
                self.clear_node(&node).await?;
                let n = node.clone();
                self.call("nodes", |mut c| async move {
                    c.srem::<_, _, ()>(NODES, n).await
                })
                .await?;
                reaped.push(node);
            }
        }
        Ok(reaped)
    }

    /// [`RedisClient::per_slot`] over users' device hashes.
    async fn per_user<I, T: redis::FromRedisValue + Send>(
        &self,
        what: &str,
        script: &Script,
        items: &[I],
        user_of: impl Fn(&I) -> &str,
        first: &[String],
        add: impl Fn(&mut redis::ScriptInvocation<'_>, &I),
    ) -> Result<Vec<T>, PresenceError> {
        self.redis
            .per_slot(what, script, items, |i| slot(user_of(i)), first, add)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(PresenceError::Unavailable)
    }
}

fn device_value(node_id: &str, last_seen_ms: i64) -> String {
    format!("{node_id}|{last_seen_ms}")
}

#[async_trait]
impl Presence for RedisPresence {
    /// The device in its user's hash, the user in `chat:online:users`, the device in its
    /// node's set: one transaction on a single Redis, one per slot on a cluster.
    async fn connect(&self, user_id: &str, device: Device) -> Result<(), PresenceError> {
        let key = devices_key(user_id);
        let user_part = vec![
            redis::cmd("HSET")
                .arg(&key)
                .arg(&device.connection_id)
                .arg(device_value(&device.node_id, device.last_seen_ms))
                .to_owned(),
            redis::cmd("PEXPIRE").arg(&key).arg(self.ttl_ms).to_owned(),
        ];
        let online = vec![redis::cmd("SADD").arg(ONLINE_USERS).arg(user_id).to_owned()];
        let node = vec![redis::cmd("SADD")
            .arg(node_devices_key(&device.node_id))
            .arg(format!("{user_id}|{}", device.connection_id))
            .to_owned()];
        Ok(self
            .redis
            .transact("connect", vec![user_part, online, node])
            .await?)
    }

    /// The device out of its user's hash (one script), then out of the indexes.
    async fn disconnect(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError> {
        let script = &self.disconnect;
        let (node, left): (String, u64) = self
            .call("disconnect", |mut c| async move {
                script
                    .key(devices_key(user_id))
                    .arg(connection_id)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let mut parts = Vec::new();
        if !node.is_empty() {
            parts.push(vec![redis::cmd("SREM")
                .arg(node_devices_key(&node))
                .arg(format!("{user_id}|{connection_id}"))
                .to_owned()]);
        }
        if left == 0 {
            parts.push(vec![redis::cmd("SREM")
                .arg(ONLINE_USERS)
                .arg(user_id)
                .to_owned()]);
        }
        if !parts.is_empty() {
            self.redis.transact("disconnect", parts).await?;
        }
        Ok(())
    }

    /// One script call per [`SCRIPT_CHUNK`](crate::redis_client::SCRIPT_CHUNK) devices (per slot on a cluster), then the users
    /// known put back in `chat:online:users` (one `SADD`): what a cluster's split updates
    /// could have left out comes back within a refresh.
    async fn refresh(&self, devices: &[(&str, &str)]) -> Result<Vec<usize>, PresenceError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let (now, ttl) = (now_ms(), self.ttl_ms);
        let known: Vec<u8> = self
            .per_user(
                "refresh devices",
                &self.refresh,
                devices,
                |d| d.0,
                &[now.to_string(), ttl.to_string()],
                |call, (user, connection)| {
                    call.key(devices_key(user)).arg(*connection);
                },
            )
            .await?;
        let online: HashSet<&str> = devices
            .iter()
            .zip(&known)
            .filter(|(_, k)| **k == 1)
            .map(|(d, _)| d.0)
            .collect();
        if !online.is_empty() {
            let online = &online;
            self.call("online users", |mut c| async move {
                c.sadd::<_, _, ()>(ONLINE_USERS, online).await
            })
            .await?;
        }
        Ok(known
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == 0)
            .map(|(i, _)| i)
            .collect())
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, PresenceError> {
        Ok(self
            .devices_many(&[user_id])
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn devices_many(&self, user_ids: &[&str]) -> Result<Vec<Vec<Device>>, PresenceError> {
        let lists: Vec<Vec<String>> = self
            .per_user(
                "devices",
                &self.devices,
                user_ids,
                |u| u,
                &[],
                |call, u| {
                    call.key(devices_key(u));
                },
            )
            .await?;
        self.live_devices(lists).await
    }

    async fn online_user_count(&self) -> Result<usize, PresenceError> {
        self.call("count", |mut c| async move { c.scard(ONLINE_USERS).await })
            .await
    }

    /// The node's set read, its devices removed from their users' hashes (per slot), users
    /// left with none out of `chat:online:users`, then the set deleted.
    async fn clear_node(&self, node_id: &str) -> Result<usize, PresenceError> {
        let set = node_devices_key(node_id);
        let members: Vec<String> = {
            let set = &set;
            self.call("clear node", |mut c| async move { c.smembers(set).await })
                .await?
        };
        let devices: Vec<(&str, &str)> = members.iter().filter_map(|m| m.split_once('|')).collect();
        let gone: Vec<u8> = if devices.is_empty() {
            Vec::new()
        } else {
            self.per_user(
                "clear node",
                &self.clear_devices,
                &devices,
                |d| d.0,
                &[node_id.to_string()],
                |call, (user, connection)| {
                    call.key(devices_key(user)).arg(*connection);
                },
            )
            .await?
        };
        let offline: HashSet<&str> = devices
            .iter()
            .zip(&gone)
            .filter(|(_, g)| **g == 1)
            .map(|(d, _)| d.0)
            .collect();
        let mut parts = vec![vec![redis::cmd("DEL").arg(&set).to_owned()]];
        if !offline.is_empty() {
            parts.push(vec![redis::cmd("SREM")
                .arg(ONLINE_USERS)
                .arg(offline.into_iter().collect::<Vec<_>>())
                .to_owned()]);
        }
        self.redis.transact("clear node", parts).await?;
        Ok(devices.len())
    }

    async fn health(&self) -> Result<(), PresenceError> {
        self.redis.ping().await.map_err(PresenceError::from)
    }

    async fn maintain(&self, node_id: &str, url: &str) -> Result<bool, PresenceError> {
        let lost = self.refresh_lease(node_id, url).await?;
        for dead in self.reap_dead_nodes().await? {
            tracing::warn!(node = %dead, "node lease lapsed: cleared its devices from presence");
        }
        Ok(lost)
    }

    async fn nodes(&self) -> Result<Vec<(String, String)>, PresenceError> {
        self.live_nodes().await
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
