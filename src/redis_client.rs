//! One Redis connection pool with a deadline on every call, shared by the Redis presence and
//! the Redis store. A Redis that stalls or dies costs a call `redis.timeout_ms`, never a hang.

use std::time::Duration;

use deadpool_redis::{Pool, Runtime};

use crate::config::RedisConfig;

#[derive(Clone)]
pub struct RedisClient {
    pool: Pool,
    /// Deadline of every call, waiting for a pooled connection included.
    timeout: Duration,
}

/// The URL with the password from config put in, unless the URL already carries credentials.
pub fn url_with_password(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if !password.is_empty() && !rest.contains('@') => {
            let encoded: String = password
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{scheme}://:{encoded}@{rest}")
        }
        _ => url.to_string(),
    }
}

impl RedisClient {
    pub fn new(config: &RedisConfig) -> Result<Self, String> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let pool =
            deadpool_redis::Config::from_url(url_with_password(&config.url, &config.password))
                .builder()
                .map_err(|e| format!("redis.url: {e}"))?
                .max_size(config.pool_size)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| format!("redis pool: {e}"))?;
        Ok(Self { pool, timeout })
    }

    /// Runs `f` on a pooled connection within the deadline; the error names `what` failed.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| format!("redis {what}: {e}"))?;
            f(conn).await.map_err(|e| format!("redis {what}: {e}"))
        };
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(self.timeout, work).await;
        crate::chat::metrics::REDIS_CALLS.observe(started.elapsed());
        match result {
            Ok(result) => result,
            Err(_) => Err(format!(
                "redis {what}: no answer within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    pub async fn ping(&self) -> Result<(), String> {
        self.call("PING", |mut c| async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(|_| ())
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
