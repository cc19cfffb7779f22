//! Nodes that an operator command starts for itself (`crossnode-test --spawn`, `bench
//! --spawn`, `bench --cluster`): `chatd serve` of this very binary on a free port, stopped
//! with SIGTERM by [`Spawned::stop`], or killed when dropped on an error path. Each node's log
//! goes to a file in the temporary directory, kept after the run, so that a failed check can
//! show what the nodes said ([`Spawned::log_tails`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

/// How long a spawned node may take to listen.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a spawned node may take to stop after SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// What to start: a profile (or none: the embedded node), a node id, extra environment.
pub struct NodeSpec<'a> {
    pub profile: Option<&'a str>,
    pub node_id: &'a str,
    pub config_dir: &'a Path,
    pub env: &'a [(&'a str, &'a str)],
}

/// Nodes this command started (with their log files), stopped when dropped.
#[derive(Default)]
pub struct Spawned(Vec<(Child, PathBuf)>);

impl Spawned {
    /// Starts a node and waits until it listens; returns its `ws://host:port`.
    pub async fn start(&mut self, spec: &NodeSpec<'_>) -> anyhow::Result<String> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["serve", "--port", "0", "--node-id", spec.node_id]);
        if let Some(profile) = spec.profile {
            command.args(["--profile", profile]);
        }
        command.arg("--config-dir").arg(spec.config_dir);
        for (k, v) in spec.env {
            command.env(k, v);
        }
        let log =
            std::env::temp_dir().join(format!("chatd-{}-{}.log", spec.node_id, std::process::id()));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create the node's log {}", log.display()))?;
        let mut child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start chatd serve")?;
        match listening_in(&log, &mut child).await {
            Ok(addr) => {
                self.0.push((child, log));
                Ok(format!("ws://{addr}"))
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let profile = spec.profile.unwrap_or("(none)");
                bail!(
                    "node {} (profile {profile}) failed to start: {why} (its log: {})",
                    spec.node_id,
                    log.display()
                )
            }
        }
    }

    /// The process ids of the nodes, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|(c, _)| c.id()).collect()
    }

    /// The last `lines` lines of each node's log, with the log's path: for the report of a
    /// failed run.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for (_, log) in &self.0 {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!(
                "--- {} (last {} lines)\n",
                log.display(),
                tail.len()
            ));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Waits until the node logging to `log` says where it listens; an error if it exits, logs a
/// fatal error, or says nothing within [`START_WITHIN`].
async fn listening_in(log: &Path, child: &mut Child) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + START_WITHIN;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split(super::LISTENING).nth(1) {
            return Ok(rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string());
        }
        if let Some(line) = text
            .lines()
            .find(|l| l.starts_with("error:") || l.contains(" ERROR "))
        {
            return Err(line.to_string());
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return Err("it exited".into());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no \"{}\" line within {START_WITHIN:?}",
                super::LISTENING.trim()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Spawned {
    /// Stops every node politely (SIGTERM, so it clears its presence), killing any that is
    /// not gone within `STOP_WITHIN`.
    pub async fn stop(mut self) {
        for (child, _) in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (child, _) in &mut self.0 {
            let deadline = tokio::time::Instant::now() + STOP_WITHIN;
            while tokio::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Drop kills and reaps whatever is left.
    }
}

impl Drop for Spawned {
    /// The last resort (an error or a panic on the way): SIGKILL, never a wait in a loop.
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
