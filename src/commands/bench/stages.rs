//! Where the senders' node spends a message's time before it leaves for the other node, from
//! its latency histograms in `/metrics` read before and after a run: the wait of a batch's
//! oldest message (linger and the lane's previous batch), the batch's store call, and the
//! publish to the broker. Their means add up to about the ack latency (the batch wait a little
//! more: it is the longest of each batch); what the receivers wait beyond it is the broker's
//! fetch and the receivers' node.

use std::time::Duration;

use serde_json::{json, Value};

/// The histograms read: (Prometheus name, what the report calls it).
const STAGES: [(&str, &str); 3] = [
    ("chatd_batch_wait_duration_seconds", "batch wait"),
    ("chatd_store_save_duration_seconds", "store call"),
    ("chatd_broker_publish_duration_seconds", "publish"),
];

/// The sum (seconds) and count of each of [`STAGES`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stages([(f64, f64); 3]);

impl Stages {
    /// The node's histograms now, or `None` when it does not answer `/metrics`.
    pub async fn read(url: &str) -> Option<Stages> {
        match crate::http::get(url, "/metrics", Duration::from_secs(5)).await {
            Ok((200, body)) => Some(parse(&body)),
            _ => None,
        }
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Stages) -> Stages {
        let mut d = *self;
        for (now, then) in d.0.iter_mut().zip(before.0) {
            *now = (now.0 - then.0, now.1 - then.1);
        }
        d
    }

    /// Batches stored (one store call each).
    pub fn batches(&self) -> f64 {
        self.0[1].1
    }

    /// `batch wait 3.98 / store call 2.78 / publish 1.37 ms (mean)`.
    pub fn line(&self) -> String {
        let means: Vec<String> = STAGES
            .iter()
            .zip(self.0)
            .map(|((_, name), (sum, n))| match n > 0.0 {
                true => format!("{name} {:.2}", sum / n * 1e3),
                false => format!("{name} -"),
            })
            .collect();
        format!("{} ms (mean)", means.join(" / "))
    }

    pub fn json(&self) -> Value {
        let mean = |(sum, n): (f64, f64)| (n > 0.0).then(|| sum / n * 1e3);
        json!({
            "batchWaitMs": mean(self.0[0]),
            "storeCallMs": mean(self.0[1]),
            "publishMs": mean(self.0[2]),
            "batches": self.batches(),
        })
    }
}

fn parse(body: &str) -> Stages {
    let mut s = Stages::default();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.split_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        for (i, (stage, _)) in STAGES.iter().enumerate() {
            match name.strip_prefix(stage) {
                Some("_sum") => s.0[i].0 = value,
                Some("_count") => s.0[i].1 = value,
                _ => {}
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stages_are_read_from_the_metrics_and_told_apart() {
        let before = parse(
            "# HELP chatd_store_save_duration_seconds x\n\
             chatd_store_save_duration_seconds_sum 1.0\n\
             chatd_store_save_duration_seconds_count 100\n\
             chatd_store_save_duration_seconds_bucket{le=\"0.001\"} 7\n",
        );
        let after = parse(
            "chatd_batch_wait_duration_seconds_sum 0.4\n\
             chatd_batch_wait_duration_seconds_count 100\n\
             chatd_store_save_duration_seconds_sum 1.3\n\
             chatd_store_save_duration_seconds_count 200\n\
             chatd_broker_publish_duration_seconds_sum 0.2\n\
             chatd_broker_publish_duration_seconds_count 50\n\
             chatd_redis_call_duration_seconds_sum 9\n",
        );
        let run = after.since(&before);
        assert_eq!(run.batches(), 100.0);
        assert_eq!(
            run.line(),
            "batch wait 4.00 / store call 3.00 / publish 4.00 ms (mean)"
        );
        assert_eq!(
            Stages::default().line(),
            "batch wait - / store call - / publish - ms (mean)"
        );
    }
}
