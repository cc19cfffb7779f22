//! Waiting before another attempt, the one way chatd does it: the wait doubles from `base`
//! up to `max`, and each wait is a random time between half and all of that (jitter from
//! `rand`), so that many clients or tasks that failed together do not try again together.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The longest wait before attempt `attempt` (0 for the first retry): `base` doubled
    /// `attempt` times, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max)
    }

    /// The wait before attempt `attempt`: between half and all of [`Backoff::ceiling`].
    pub fn delay(&self, attempt: u32) -> Duration {
        let full = self.ceiling(attempt);
        full / 2 + full.mul_f64(rand::rng().random_range(0.0..=0.5))
    }

    /// Sleeps [`Backoff::delay`].
    pub async fn wait(&self, attempt: u32) {
        tokio::time::sleep(self.delay(attempt)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

    #[test]
    fn the_ceiling_doubles_up_to_the_max_and_never_overflows() {
        let ms = |a| B.ceiling(a).as_millis();
        assert_eq!((ms(0), ms(1), ms(2), ms(5)), (100, 200, 400, 3200));
        assert_eq!((ms(6), ms(40), ms(u32::MAX)), (5000, 5000, 5000));
    }

    #[test]
    fn each_wait_is_between_half_and_all_of_the_ceiling_and_they_differ() {
        let mut seen = std::collections::BTreeSet::new();
        for attempt in 0..8 {
            for _ in 0..50 {
                let d = B.delay(attempt);
                let full = B.ceiling(attempt);
                assert!(d >= full / 2 && d <= full, "{attempt}: {d:?} of {full:?}");
                seen.insert(d);
            }
        }
        assert!(
            seen.len() > 100,
            "jitter: {} distinct waits of 400",
            seen.len()
        );
    }
}
