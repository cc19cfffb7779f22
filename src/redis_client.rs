//! The Redis connections of a process, shared by the Redis presence and the Redis store:
//! `redis.pool_size` multiplexed connections, calls spread over them in turn. A multiplexed
//! connection carries the calls of every task at once, pipelined, with no checkout: a pool
//! checked each connection out with a PING and an UNWATCH, two extra commands per call.
//! Every call has a deadline; a connection that fails or misses one is dropped and made
//! again by the next call, so a Redis that stalls or dies costs a call `redis.timeout_ms`,
//! never a hang.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

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
}

#[derive(Clone)]
pub struct RedisClient {
    client: redis::Client,
    /// The connections, each made on first use and again after a failure.
    slots: Arc<[tokio::sync::Mutex<Option<MultiplexedConnection>>]>,
    /// Which slot the next call uses.
    next: Arc<AtomicUsize>,
    /// Deadline of every call, connecting included.
    timeout: Duration,
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

impl RedisClient {
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let client = redis::Client::open(url_with_password(&config.url, &config.password))
            .map_err(RedisError::Url)?;
        let slots = (0..config.pool_size.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        Ok(Self {
            client,
            slots,
            next: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// A connection of `slot`, made now if it has none.
    async fn connection(&self, slot: usize) -> redis::RedisResult<MultiplexedConnection> {
        let mut held = self.slots[slot].lock().await;
        if let Some(c) = &*held {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
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
        F: FnOnce(MultiplexedConnection) -> Fut,
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

    pub async fn ping(&self) -> Result<(), RedisError> {
        self.call("PING", |mut c| async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(|_| ())
    }
}

/// Runs `pipe`, a pipeline of calls of `script`; if Redis lost the script (it restarted empty:
/// scripts are not persisted), loads it and runs the pipeline again. Nothing ran the first
/// time: every call of a missing script fails.
pub async fn query_script_pipe<T: redis::FromRedisValue>(
    c: &mut MultiplexedConnection,
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
}
