//! The Redis connections of a process, shared by the Redis presence and the Redis store:
//! `redis.pool_size` multiplexed connections, calls spread over them in turn; on Redis Cluster
//! (`redis.cluster = true`) each is a cluster connection, which routes every call to the master
//! of its keys' slot and follows the cluster when slots move or a replica is promoted. A multiplexed
//! connection carries the calls of every task at once, pipelined, with no checkout: a pool
//! checked each connection out with a PING and an UNWATCH, two extra commands per call.
//! Every call has a deadline; a connection that fails or misses one is dropped and made
//! again by the next call, so a Redis that stalls or dies costs a call `redis.timeout_ms`,
//! never a hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};

use crate::config::RedisConfig;

/// What went wrong with a Redis call, with Redis's own error kept (typed) as its cause. The
/// message shows the cause, as every log line prints only the message; so `source()` does not
/// give it again (a chain printed by `anyhow` would show it twice).
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// `redis.url` (or a store URL) is not a Redis URL. The URL is not repeated: it may hold
    /// the password.
    #[error("redis.url: {0}")]
    Url(redis::RedisError),
    #[error("redis {what}: {cause}")]
    Failed {
        what: String,
        cause: redis::RedisError,
    },
    #[error("redis {what}: no answer within {} ms", .after.as_millis())]
    Timeout { what: String, after: Duration },
    /// The write is on the master, but fewer replicas than `store.wait_replicas` confirmed it
    /// in time: it is not acknowledged (a retry is idempotent).
    #[error(
        "redis {what}: written on the master, but {acked} of {wanted} replicas confirmed it \
         within {timeout_ms} ms (store.wait_replicas); retry"
    )]
    NotReplicated {
        what: String,
        acked: u32,
        wanted: u32,
        timeout_ms: u64,
    },
}

/// A connection to one Redis or to a Redis Cluster; every call site takes this one type.
#[derive(Clone)]
pub enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
enum Client {
    Single(redis::Client),
    /// The seed URLs: the cluster client is made with each connection, so that it takes the
    /// deadline as it is then (a store waiting for replicas has a longer one).
    Cluster(Vec<String>),
}

fn cluster_client(
    seeds: &[String],
    timeout: Duration,
) -> redis::RedisResult<redis::cluster::ClusterClient> {
    redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .build()
}

#[derive(Clone)]
pub struct RedisClient {
    client: Client,
    /// The connections, each made on first use and again after a failure.
    slots: Arc<[tokio::sync::Mutex<Option<Connection>>]>,
    /// Which slot the next call uses.
    next: Arc<AtomicUsize>,
    /// Deadline of every call, connecting included.
    timeout: Duration,
    /// Replicas each write of [`per_slot`](Self::per_slot) and [`write_script`](Self::write_script)
    /// waits for (Redis `WAIT`), and for how long (ms); none when `None`.
    wait: Option<(u32, u64)>,
}

/// The URL with the password from config put in (percent-encoded by the `url` crate),
/// unless the URL already carries credentials or does not parse (then Redis's own parser
/// reports it).
pub fn url_with_password(url: &str, password: &str) -> String {
    if password.is_empty() {
        return url.to_string();
    }
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_none() && u.username().is_empty() => {
            if u.set_password(Some(password)).is_err() {
                return url.to_string();
            }
            u.into()
        }
        _ => url.to_string(),
    }
}

/// The hash slot of `key` in Redis Cluster: CRC16 of its hash tag (the part between the first
/// `{` and the next `}`, when not empty), else of the whole key, modulo 16,384. The store
/// groups a batch's calls by it: one call per slot, not per key.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = key.find('{').and_then(|open| {
        let close = key[open + 1..].find('}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % 16384
}

impl RedisClient {
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = if config.cluster {
            let seeds: Vec<String> = config
                .url
                .split(',')
                .map(|u| url_with_password(u.trim(), &config.password))
                .collect();
            // Made now only to check the URLs.
            cluster_client(&seeds, timeout).map_err(RedisError::Url)?;
            Client::Cluster(seeds)
        } else {
            Client::Single(
                redis::Client::open(url_with_password(&config.url, &config.password))
                    .map_err(RedisError::Url)?,
            )
        };
        let slots = (0..config.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Ok(Self {
            client,
            slots,
            next: Arc::new(AtomicUsize::new(0)),
            timeout,
            wait: None,
        })
    }

    /// This client with its script writes waiting for `replicas` replicas (at most
    /// `timeout_ms` each): the store's, for `store.wait_replicas`. The deadline of a call
    /// grows by the wait.
    pub fn waiting_for_replicas(mut self, replicas: u32, timeout_ms: u64) -> Self {
        if replicas > 0 {
            self.wait = Some((replicas, timeout_ms));
            self.timeout += Duration::from_millis(timeout_ms);
        }
        self
    }

    /// Appends the `WAIT` of [`waiting_for_replicas`](Self::waiting_for_replicas) to `pipe`.
    fn add_wait(&self, pipe: &mut redis::Pipeline) {
        if let Some((replicas, timeout_ms)) = self.wait {
            pipe.cmd("WAIT").arg(replicas).arg(timeout_ms);
        }
    }

    /// Splits the reply of a pipeline that ends with [`add_wait`](Self::add_wait)'s `WAIT`:
    /// the other replies, or how many replicas fell short.
    fn check_wait(&self, what: &str, mut replies: Vec<Value>) -> Result<Vec<Value>, RedisError> {
        let Some((wanted, timeout_ms)) = self.wait else {
            return Ok(replies);
        };
        let acked = match replies.pop() {
            Some(Value::Int(n)) => u32::try_from(n).unwrap_or(0),
            _ => 0,
        };
        if acked < wanted {
            return Err(RedisError::NotReplicated {
                what: what.to_string(),
                acked,
                wanted,
                timeout_ms,
            });
        }
        Ok(replies)
    }

    /// One call of a script that writes (`invocation` of `script`), waiting for replicas as
    /// [`waiting_for_replicas`](Self::waiting_for_replicas) says.
    pub async fn write_script<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &redis::Script,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(invocation);
        self.add_wait(&mut pipe);
        let pipe = &pipe;
        let replies: Vec<Value> = self
            .call(what, |mut c| async move {
                query_script_pipe(&mut c, pipe, script).await
            })
            .await?;
        let reply = self.check_wait(what, replies)?.pop().unwrap_or(Value::Nil);
        redis::from_redis_value(&reply).map_err(|cause| RedisError::Failed {
            what: what.to_string(),
            cause,
        })
    }

    /// Whether this is a Redis Cluster: a call's keys must then share one slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// A connection of `slot`, made now if it has none.
    async fn connection(&self, slot: usize) -> redis::RedisResult<Connection> {
        let mut held = self.slots[slot].lock().await;
        if let Some(c) = &*held {
            return Ok(c.clone());
        }
        let c = match &self.client {
            Client::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout);
                Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Client::Cluster(seeds) => Connection::Cluster(
                cluster_client(seeds, self.timeout)?
                    .get_async_connection()
                    .await?,
            ),
        };
        *held = Some(c.clone());
        Ok(c)
    }

    /// Forgets `slot`'s connection after a failure; the next call makes a new one.
    async fn drop_connection(&self, slot: usize) {
        *self.slots[slot].lock().await = None;
    }

    /// Runs `f` on a connection within the deadline; the error names `what` failed.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let work = async {
            let conn = self.connection(slot).await?;
            f(conn).await
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, work).await;
        crate::chat::metrics::REDIS_CALLS.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A reply that is an error (a script's, NOSCRIPT) leaves the connection good.
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                {
                    self.drop_connection(slot).await;
                }
                Err(RedisError::Failed {
                    what: what.to_string(),
                    cause: e,
                })
            }
            Err(_) => {
                self.drop_connection(slot).await;
                Err(RedisError::Timeout {
                    what: what.to_string(),
                    after: self.timeout,
                })
            }
        }
    }

    /// On a cluster the PING goes to every master (redis-rs routes it to all nodes), so a
    /// master that is down makes the check fail.
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.call("PING", |mut c| async move {
            redis::cmd("PING").query_async::<Value>(&mut c).await
        })
        .await
        .map(|_| ())
    }
}

/// Most items one script call of [`RedisClient::per_slot`] takes: Redis runs nothing else
/// meanwhile (256 saves take it about 10 ms). More are several calls in one pipeline.
pub const SCRIPT_CHUNK: usize = 256;

impl RedisClient {
    /// Runs `script` once per item (each item's keys in the slot `slot_of` names; every call
    /// starts with the arguments `first`, then `add` adds each item's keys and arguments; each
    /// round trip waits for replicas as [`waiting_for_replicas`](Self::waiting_for_replicas) says) and answers
    /// each item's reply, in order, or why its call failed. On a single Redis all items go in
    /// one round trip (calls of [`SCRIPT_CHUNK`] items, pipelined); on a cluster one such round trip per
    /// slot, all slots at once. The items of one slot run in the order given.
    pub async fn per_slot<I, T>(
        &self,
        what: &str,
        script: &redis::Script,
        items: &[I],
        slot_of: impl Fn(&I) -> u16,
        first: &[String],
        add: impl Fn(&mut redis::ScriptInvocation<'_>, &I),
    ) -> Vec<Result<T, String>>
    where
        T: redis::FromRedisValue + Send,
    {
        let mut groups: std::collections::BTreeMap<u16, Vec<usize>> = Default::default();
        for (i, item) in items.iter().enumerate() {
            let slot = if self.is_cluster() { slot_of(item) } else { 0 };
            groups.entry(slot).or_default().push(i);
        }
        let calls = groups.into_values().map(|indexes| {
            let mut pipe = redis::pipe();
            for part in indexes.chunks(SCRIPT_CHUNK) {
                let mut call = script.prepare_invoke();
                for a in first {
                    call.arg(a);
                }
                for &i in part {
                    add(&mut call, &items[i]);
                }
                pipe.invoke_script(&call);
            }
            self.add_wait(&mut pipe);
            async move {
                let pipe = &pipe;
                let replies = self
                    .call(what, |mut c| async move {
                        query_script_pipe::<Vec<Value>>(&mut c, pipe, script).await
                    })
                    .await
                    .and_then(|r| self.check_wait(what, r))
                    .and_then(|r| {
                        r.iter()
                            .map(redis::from_redis_value::<Vec<T>>)
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|cause| RedisError::Failed {
                                what: what.to_string(),
                                cause,
                            })
                    });
                (indexes, replies)
            }
        });
        let mut out: Vec<Option<Result<T, String>>> = (0..items.len()).map(|_| None).collect();
        for (indexes, replies) in futures_util::future::join_all(calls).await {
            let replies: Vec<T> = match replies {
                Ok(r) => r.into_iter().flatten().collect(),
                Err(why) => {
                    for i in indexes {
                        out[i] = Some(Err(why.to_string()));
                    }
                    continue;
                }
            };
            if replies.len() != indexes.len() {
                let why = format!(
                    "{what}: {} answers to {} items",
                    replies.len(),
                    indexes.len()
                );
                for i in indexes {
                    out[i] = Some(Err(why.clone()));
                }
                continue;
            }
            for (i, reply) in indexes.into_iter().zip(replies) {
                out[i] = Some(Ok(reply));
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(format!("{what}: no answer"))))
            .collect()
    }

    /// Runs `parts`, each a list of commands whose keys share one slot: on a single Redis all
    /// in one transaction (MULTI/EXEC, one round trip); on a cluster each part as a transaction
    /// of its own slot, all parts at once. For updates whose keys a cluster spreads over slots
    /// (a user's devices and the set of online users): each part is atomic, the whole only on
    /// a single Redis; each part must be right whatever the others did.
    pub async fn transact(
        &self,
        what: &str,
        parts: Vec<Vec<redis::Cmd>>,
    ) -> Result<(), RedisError> {
        let pipes: Vec<redis::Pipeline> = if self.is_cluster() {
            parts
                .into_iter()
                .filter(|p| !p.is_empty())
                .map(|part| {
                    let mut pipe = redis::pipe();
                    pipe.atomic();
                    for c in part {
                        pipe.add_command(c).ignore();
                    }
                    pipe
                })
                .collect()
        } else {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for c in parts.into_iter().flatten() {
                pipe.add_command(c).ignore();
            }
            vec![pipe]
        };
        let calls = pipes.iter().map(|pipe| {
            self.call(what, move |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
        });
        futures_util::future::try_join_all(calls).await.map(|_| ())
    }
}

/// Runs `pipe`, a pipeline of calls of `script`; if Redis lost the script (it restarted empty:
/// scripts are not persisted), loads it and runs the pipeline again. Nothing ran the first
/// time: every call of a missing script fails.
pub async fn query_script_pipe<T: redis::FromRedisValue>(
    c: &mut Connection,
    pipe: &redis::Pipeline,
    script: &redis::Script,
) -> redis::RedisResult<T> {
    match pipe.query_async(c).await {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            script.prepare_invoke().load_async(c).await?;
            pipe.query_async(c).await
        }
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_goes_into_the_url() {
        assert_eq!(
            url_with_password("redis://127.0.0.1:6379/0", ""),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            url_with_password("redis://127.0.0.1:6379/0", "p@ss"),
            "redis://:p%40ss@127.0.0.1:6379/0"
        );
        assert_eq!(url_with_password("redis://:x@h:1", "y"), "redis://:x@h:1");
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from Redis's own CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("chat:{alice}:seq"), slot("alice"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot("foo{}{bar}"), slot("bar"));
    }
}
