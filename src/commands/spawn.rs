//! Nodes that an operator command starts for itself (`crossnode-test --spawn`, `bench
//! --spawn`, `bench --cluster`): `chatd serve` of this very binary on a free port, stopped
//! with SIGTERM by [`Spawned::stop`], or killed when dropped on an error path.

use std::path::Path;
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

/// Nodes this command started, stopped when dropped.
#[derive(Default)]
pub struct Spawned(Vec<Child>);

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
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start chatd serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        // Reading the node's log blocks: not on a runtime thread.
        let started =
            tokio::task::spawn_blocking(move || super::listening_address(stderr, START_WITHIN))
                .await?;
        match started {
            Ok(addr) => {
                self.0.push(child);
                Ok(format!("ws://{addr}"))
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                let profile = spec.profile.unwrap_or("(none)");
                bail!(
                    "node {} (profile {profile}) failed to start: {why}",
                    spec.node_id
                )
            }
        }
    }

    /// The process ids of the nodes, in start order.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Spawned {
    /// Stops every node politely (SIGTERM, so it clears its presence), killing any that is
    /// not gone within `STOP_WITHIN`.
    pub async fn stop(mut self) {
        for child in &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.0 {
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
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
