//! The sends `chatd connect` has not seen acknowledged: sent again, with the same
//! `tempMessageId` (so the store keeps each once), after a reconnect or after the node refused
//! them for now.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// Sends not acknowledged yet, by `tempMessageId`, in the order they were sent.
#[derive(Default)]
pub struct Unacked {
    frames: BTreeMap<u64, (String, String)>,
    by_temp: HashMap<String, u64>,
    next: u64,
    /// Refused for now (store down, rate limit): sent again at `retry_at`.
    refused: BTreeSet<u64>,
    pub retry_at: Option<Instant>,
}

impl Unacked {
    pub fn add(&mut self, temp: String, frame: String) {
        self.next += 1;
        if let Some(old) = self.by_temp.insert(temp.clone(), self.next) {
            self.frames.remove(&old);
        }
        self.frames.insert(self.next, (temp, frame));
    }

    pub fn done(&mut self, temp: &str) {
        if let Some(n) = self.by_temp.remove(temp) {
            self.frames.remove(&n);
            self.refused.remove(&n);
        }
    }

    /// The node refused this send for now: send it again in a moment.
    pub fn refused(&mut self, temp: &str, retry_in: Duration) {
        if let Some(n) = self.by_temp.get(temp) {
            self.refused.insert(*n);
            self.retry_at
                .get_or_insert_with(|| Instant::now() + retry_in);
        }
    }

    /// What was refused, to send again now, in the order first sent.
    pub fn take_refused(&mut self) -> Vec<String> {
        self.retry_at = None;
        std::mem::take(&mut self.refused)
            .into_iter()
            .filter_map(|n| self.frames.get(&n).map(|(_, frame)| frame.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// After a reconnect: everything not acknowledged, to send again, in the order first
    /// sent.
    pub fn take_all(&mut self) -> Vec<String> {
        self.retry_at = None;
        self.refused.clear();
        self.frames
            .values()
            .map(|(_, frame)| frame.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resends_keep_the_first_order_and_forget_what_was_acknowledged() {
        let mut u = Unacked::default();
        for t in ["a", "b", "c"] {
            u.add(t.into(), format!("frame {t}"));
        }
        u.done("b");
        assert_eq!(u.len(), 2);
        assert_eq!(u.take_all(), ["frame a", "frame c"]);
        // Sent again under the same tempMessageId: one entry, at its new place.
        u.add("a".into(), "frame a2".into());
        assert_eq!(u.take_all(), ["frame c", "frame a2"]);
        u.done("c");
        u.done("a");
        u.done("unknown");
        assert!(u.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn refused_sends_wait_and_go_again_in_order() {
        let mut u = Unacked::default();
        for t in ["a", "b", "c"] {
            u.add(t.into(), format!("frame {t}"));
        }
        u.refused("c", Duration::from_millis(500));
        let first = u.retry_at.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        u.refused("a", Duration::from_millis(500));
        assert_eq!(
            u.retry_at,
            Some(first),
            "one retry time for the refusals of a run"
        );
        u.refused("nobody", Duration::from_millis(500));
        assert_eq!(u.take_refused(), ["frame a", "frame c"]);
        assert_eq!(u.retry_at, None);
        assert!(u.take_refused().is_empty());
        // An acknowledged send is not sent again, refused or not.
        u.refused("b", Duration::from_millis(500));
        u.done("b");
        assert!(u.take_refused().is_empty());
        assert_eq!(u.len(), 2);
    }
}
