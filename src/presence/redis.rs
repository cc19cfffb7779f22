//! Presence in Redis, shared by every node of a cluster. Every update of one user is one Lua
//! script (atomic); every call has a deadline, so a Redis that stalls or dies costs a session
//! a timeout error, never a hang.
//!
//! Key layout (documented in the README for `redis-cli`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `chat:online:users` | set | user ids with at least one device (the seed's key) |
//! | `chat:user:devices:{userId}` | hash | connectionId -> `{nodeId}\|{lastSeenMs}`; expires `ttl` after the last update |
//! | `chat:node:devices:{nodeId}` | set | `{userId}\|{connectionId}` of that node, to clear it in one go |
//! | `chat:node:lease:{nodeId}` | string | the node's REST URL; expires `node_lease_secs` after the last refresh |
//! | `chat:nodes` | set | node ids ever seen alive and not yet cleaned up |
//!
//! A device counts only while its node's lease exists, so the users of a node killed with
//! SIGKILL read as offline once its lease lapses; the next janitor pass on any live node then
//! removes them for good.

use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::{Device, Presence, PresenceError};
use crate::chat::ids::now_ms;
use crate::redis_client::{RedisClient, RedisError};

pub const ONLINE_USERS: &str = "chat:online:users";
pub const NODES: &str = "chat:nodes";
const DEVICES_PREFIX: &str = "chat:user:devices:";
const NODE_DEVICES_PREFIX: &str = "chat:node:devices:";
const LEASE_PREFIX: &str = "chat:node:lease:";

pub fn devices_key(user_id: &str) -> String {
    format!("{DEVICES_PREFIX}{user_id}")
}

pub fn node_devices_key(node_id: &str) -> String {
    format!("{NODE_DEVICES_PREFIX}{node_id}")
}

pub fn lease_key(node_id: &str) -> String {
    format!("{LEASE_PREFIX}{node_id}")
}

const CONNECT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3] .. '|' .. ARGV[1])
return 1
"#;

const DISCONNECT: &str = r#"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then
  local node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
  redis.call('SREM', ARGV[3] .. node, ARGV[2] .. '|' .. ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"#;

/// Refreshes devices' last-seen time, keeping their node: KEYS the user's device hashes,
/// ARGV now, ttl ms, then each device's connection id. Returns the (1-based) places of the
/// devices it does not know (Redis lost them, or the janitor reaped them): the node registers
/// them again.
const REFRESH: &str = r#"
local unknown = {}
for k = 1, #KEYS do
  local conn = ARGV[k + 2]
  local v = redis.call('HGET', KEYS[k], conn)
  if v then
    local node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
    redis.call('HSET', KEYS[k], conn, node .. '|' .. ARGV[1])
    redis.call('PEXPIRE', KEYS[k], ARGV[2])
  else
    unknown[#unknown + 1] = k
  end
end
return unknown
"#;

/// The user's devices whose node holds a lease, as a flat [conn, value, ...] list.
const DEVICES: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
  if redis.call('EXISTS', ARGV[1] .. node) == 1 then
    out[#out + 1] = all[i]
    out[#out + 1] = v
  end
end
return out
"#;

/// The live devices of every user in KEYS (each a device hash), one flat [conn, value, ...]
/// list per key, in order; each node's lease is looked up once.
const DEVICES_MANY: &str = r#"
local leases = {}
local out = {}
for k = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  local list = {}
  for i = 1, #all, 2 do
    local v = all[i + 1]
    local node = string.sub(v, 1, string.find(v, '|', 1, true) - 1)
    if leases[node] == nil then leases[node] = redis.call('EXISTS', ARGV[1] .. node) == 1 end
    if leases[node] then
      list[#list + 1] = all[i]
      list[#list + 1] = v
    end
  end
  out[k] = list
end
return out
"#;

/// Every node of KEYS[1] (`chat:nodes`) and its lease's value, "" when it lapsed: a flat
/// [node, url, ...] list.
const NODES_WITH_LEASES: &str = r#"
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = node
  out[#out + 1] = redis.call('GET', ARGV[1] .. node) or ''
end
return out
"#;

/// Removes every device of a node: KEYS[1] its device set, KEYS[2] the online set.
const CLEAR_NODE: &str = r#"
local members = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, m in ipairs(members) do
  local sep = string.find(m, '|', 1, true)
  local user = string.sub(m, 1, sep - 1)
  local conn = string.sub(m, sep + 1)
  local dk = ARGV[1] .. user
  local v = redis.call('HGET', dk, conn)
  if v and string.sub(v, 1, string.find(v, '|', 1, true) - 1) == ARGV[2] then
    n = n + redis.call('HDEL', dk, conn)
  end
  if redis.call('HLEN', dk) == 0 then redis.call('SREM', KEYS[2], user) end
end
redis.call('DEL', KEYS[1])
return n
"#;

/// Devices one refresh script call takes: Redis runs nothing else meanwhile.
const REFRESH_CHUNK: usize = 256;

pub struct RedisPresence {
    redis: RedisClient,
    ttl_ms: i64,
    lease: Duration,
    connect: Script,
    disconnect: Script,
    refresh: Script,
    devices: Script,
    devices_many: Script,
    clear_node: Script,
    nodes: Script,
}

impl RedisPresence {
    pub fn new(redis: RedisClient, ttl_secs: u64, lease_secs: u64) -> Self {
        Self {
            redis,
            ttl_ms: (ttl_secs as i64).saturating_mul(1000),
            lease: Duration::from_secs(lease_secs),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            refresh: Script::new(REFRESH),
            devices: Script::new(DEVICES),
            devices_many: Script::new(DEVICES_MANY),
            clear_node: Script::new(CLEAR_NODE),
            nodes: Script::new(NODES_WITH_LEASES),
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
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.redis.call(what, f).await.map_err(PresenceError::from)
    }

    /// Devices from a flat [conn, `{node}|{lastSeenMs}`, ...] list, the expired ones left out.
    fn live_devices(&self, flat: Vec<String>) -> Vec<Device> {
        let now = now_ms();
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
    }

    /// Refreshes this node's lease (with its REST URL as value) and its place in `chat:nodes`.
    /// Returns whether the lease had to be created anew: Redis restarted empty, or the lease
    /// lapsed and a janitor cleared this node's devices.
    pub async fn refresh_lease(&self, node_id: &str, url: &str) -> Result<bool, PresenceError> {
        let lease_ms = self.lease.as_millis() as u64;
        let (key, url) = (lease_key(node_id), url.to_string());
        let (existed,): (bool,) = self
            .call("lease", |mut c| async move {
                redis::pipe()
                    .atomic()
                    .exists(&key)
                    .cmd("SET")
                    .arg(&key)
                    .arg(&url)
                    .arg("PX")
                    .arg(lease_ms)
                    .ignore()
                    .sadd(NODES, node_id)
                    .ignore()
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(!existed)
    }

    /// Every node in `chat:nodes` with its lease's URL (`None` once the lease lapsed), in one
    /// call: the janitor runs this on every node every third of a lease.
    async fn known_nodes(&self) -> Result<Vec<(String, Option<String>)>, PresenceError> {
        let script = &self.nodes;
        let flat: Vec<String> = self
            .call("nodes", |mut c| async move {
                script
                    .key(NODES)
                    .arg(LEASE_PREFIX)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), (!p[1].is_empty()).then(|| p[1].clone())))
            .collect())
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
}

fn device_value(node_id: &str, last_seen_ms: i64) -> String {
    format!("{node_id}|{last_seen_ms}")
}

#[async_trait]
impl Presence for RedisPresence {
    async fn connect(&self, user_id: &str, device: Device) -> Result<(), PresenceError> {
        let script = &self.connect;
        let ttl = self.ttl_ms;
        self.call("connect", |mut c| async move {
            script
                .key(devices_key(user_id))
                .key(ONLINE_USERS)
                .key(node_devices_key(&device.node_id))
                .arg(&device.connection_id)
                .arg(device_value(&device.node_id, device.last_seen_ms))
                .arg(user_id)
                .arg(ttl)
                .invoke_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn disconnect(&self, user_id: &str, connection_id: &str) -> Result<(), PresenceError> {
        let script = &self.disconnect;
        self.call("disconnect", |mut c| async move {
            script
                .key(devices_key(user_id))
                .key(ONLINE_USERS)
                .arg(connection_id)
                .arg(user_id)
                .arg(NODE_DEVICES_PREFIX)
                .invoke_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// One pipeline of script calls of [`REFRESH_CHUNK`] devices each: one round trip.
    async fn refresh(&self, devices: &[(&str, &str)]) -> Result<Vec<usize>, PresenceError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for chunk in devices.chunks(REFRESH_CHUNK) {
            let mut call = self.refresh.prepare_invoke();
            call.arg(now_ms()).arg(self.ttl_ms);
            for (user, connection) in chunk {
                call.key(devices_key(user)).arg(*connection);
            }
            pipe.invoke_script(&call);
        }
        let (script, pipe) = (&self.refresh, &pipe);
        let replies: Vec<Vec<usize>> = self
            .call("refresh devices", |mut c| async move {
                crate::redis_client::query_script_pipe(&mut c, pipe, script).await
            })
            .await?;
        Ok(replies
            .into_iter()
            .enumerate()
            .flat_map(|(chunk, places)| {
                places
                    .into_iter()
                    .map(move |k| chunk * REFRESH_CHUNK + k.saturating_sub(1))
            })
            .collect())
    }

    async fn devices(&self, user_id: &str) -> Result<Vec<Device>, PresenceError> {
        let script = &self.devices;
        let flat: Vec<String> = self
            .call("devices", |mut c| async move {
                script
                    .key(devices_key(user_id))
                    .arg(LEASE_PREFIX)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(self.live_devices(flat))
    }

    async fn devices_many(&self, user_ids: &[&str]) -> Result<Vec<Vec<Device>>, PresenceError> {
        let mut call = self.devices_many.prepare_invoke();
        for u in user_ids {
            call.key(devices_key(u));
        }
        call.arg(LEASE_PREFIX);
        let call = &call;
        let lists: Vec<Vec<String>> = self
            .call("devices of many", |mut c| async move {
                call.invoke_async(&mut c).await
            })
            .await?;
        if lists.len() != user_ids.len() {
            return Err(PresenceError::Unavailable(format!(
                "devices script answered {} lists for {} users",
                lists.len(),
                user_ids.len()
            )));
        }
        Ok(lists
            .into_iter()
            .map(|flat| self.live_devices(flat))
            .collect())
    }

    async fn online_user_count(&self) -> Result<usize, PresenceError> {
        self.call("count", |mut c| async move { c.scard(ONLINE_USERS).await })
            .await
    }

    async fn clear_node(&self, node_id: &str) -> Result<usize, PresenceError> {
        let script = &self.clear_node;
        self.call("clear node", |mut c| async move {
            script
                .key(node_devices_key(node_id))
                .key(ONLINE_USERS)
                .arg(DEVICES_PREFIX)
                .arg(node_id)
                .invoke_async(&mut c)
                .await
        })
        .await
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
