//! A token bucket: `rate` tokens a second on average, `burst` at once. The node limits each
//! connection with one (`server.rate_limit_*`), and `chatd connect` paces itself with one a
//! little under the node's.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Full: `burst` tokens now, then `rate` a second.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token, waiting for one if need be.
    pub async fn take(&mut self) {
        while !self.try_take() {
            let missing = (1.0 - self.tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(missing)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let mut b = TokenBucket::new(10.0, 3.0);
        assert!(b.try_take() && b.try_take() && b.try_take());
        assert!(!b.try_take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.try_take());
        let start = Instant::now();
        b.take().await;
        assert!(start.elapsed() >= Duration::from_millis(99));
    }
}
