//! A token bucket: `rate` tokens a second on average, `burst` at once. The node limits each
//! connection with one (`server.rate_limit_*`) and counts strikes against a client that keeps
//! sending after it was told ([`FrameLimit`]); `chatd connect` paces itself with one a little
//! under the node's.

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
        self.try_take_at(Instant::now())
    }

    /// Takes a token if there is one at `now` (a clock read costs about as much as the rest).
    fn try_take_at(&mut self, now: Instant) -> bool {
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

/// What to do with a frame under a connection's [`FrameLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused with `ERROR RATE_LIMITED`; the connection stays.
    Refuse,
    /// The client kept sending after it was told: close it (1008).
    Close,
}

/// A connection's rate limit, and the strikes against a client that does not slow down.
///
/// The frames a client sent before it could have read its first `RATE_LIMITED` are one
/// burst: refused, but not held against it. So a refusal counts as a strike only when it
/// comes more than `grace` after the first refusal of its run, and `max_strikes` strikes
/// close the connection. A run (and its strikes) ends when a frame is let through `grace`
/// or more after the last refusal: the client slowed down.
#[derive(Debug)]
pub struct FrameLimit {
    bucket: TokenBucket,
    grace: Duration,
    max_strikes: u32,
    strikes: u32,
    /// The current run of refusals: when it began, and the last refusal.
    run: Option<(Instant, Instant)>,
}

impl FrameLimit {
    pub fn new(rate: u32, burst: u32, grace: Duration, max_strikes: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate as f64, burst as f64),
            grace,
            max_strikes,
            strikes: 0,
            run: None,
        }
    }

    pub fn check(&mut self) -> Verdict {
        let now = Instant::now();
        if self.bucket.try_take_at(now) {
            if self
                .run
                .is_some_and(|(_, last)| now.duration_since(last) >= self.grace)
            {
                self.run = None;
                self.strikes = 0;
            }
            return Verdict::Allow;
        }
        let (began, last) = self.run.get_or_insert((now, now));
        *last = now;
        if now.duration_since(*began) >= self.grace {
            self.strikes += 1;
        }
        if self.strikes >= self.max_strikes {
            Verdict::Close
        } else {
            Verdict::Refuse
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

    #[tokio::test(start_paused = true)]
    async fn one_burst_is_refused_but_not_held_against_the_client() {
        let mut l = FrameLimit::new(10, 5, Duration::from_secs(1), 3);
        let verdicts: Vec<_> = (0..100).map(|_| l.check()).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Allow).count(), 5);
        assert!(!verdicts.contains(&Verdict::Close));
        // It slows down: everything goes through, and a later burst starts afresh.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(150)).await;
            assert_eq!(l.check(), Verdict::Allow);
        }
        assert!((0..100).all(|_| l.check() != Verdict::Close));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_sending_after_the_grace_is_closed() {
        let mut l = FrameLimit::new(10, 5, Duration::from_secs(1), 3);
        let mut closed_at = None;
        // 100 frames a second, ten times the rate, for up to 3 s.
        for i in 0..300 {
            if l.check() == Verdict::Close {
                closed_at = Some(i);
                break;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        let at = closed_at.expect("never closed");
        assert!((100..130).contains(&at), "closed at frame {at}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_grace_every_refusal_in_a_row_is_a_strike() {
        let mut l = FrameLimit::new(10, 1, Duration::ZERO, 3);
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Refuse);
        assert_eq!(l.check(), Verdict::Refuse);
        assert_eq!(l.check(), Verdict::Close);
    }
}
