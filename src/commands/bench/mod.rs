//! `chatd bench`: how much one node does, measured with real WebSocket clients. Pairs of
//! users send each other messages as fast as the node acknowledges them; the command reports
//! delivered messages per second and the send-to-receive latency. With `--spawn` it also
//! starts the node itself and reports its memory: resident set before, with `--idle` idle
//! connections open, and per connection.

mod cluster;
mod group;
mod stages;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::spawn::{NodeSpec, Spawned};
use crate::client::Client;

/// The environment of a spawned node: limits that would throttle a benchmark lifted, and
/// per-message logging off.
const UNLIMITED: &[(&str, &str)] = &[
    ("CHATD_SERVER__RATE_LIMIT_PER_SEC", "1000000000"),
    ("CHATD_SERVER__RATE_LIMIT_BURST", "1000000000"),
    ("CHATD_SERVER__MAX_CONNECTIONS", "18000"),
    ("CHATD_SERVER__MAX_DEVICES_PER_USER", "100000"),
    ("RUST_LOG", "warn,chatd::commands::serve=info"),
];

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The node to measure (ignored with --spawn)
    #[arg(long, default_value = super::DEFAULT_URL)]
    pub url: String,
    /// Start a node of this binary for the run (in-memory backends, no rate limit) and measure
    /// its memory too
    #[arg(long)]
    pub spawn: bool,
    /// Sender/receiver pairs, each on its own connections
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Messages each sender sends
    #[arg(long, default_value_t = 200)]
    pub messages: usize,
    /// Messages a sender has in flight before it waits for acks
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Idle connections to open for the memory figure (with --spawn)
    #[arg(long, default_value_t = 2000)]
    pub idle: usize,
    /// Measure the cross-node path instead: start two nodes (profile node1 settings, node ids
    /// benchA and benchB) on the services of scripts/services.sh, senders on the first,
    /// receivers on the second
    #[arg(long, conflicts_with = "spawn")]
    pub cluster: bool,
    /// With --cluster: take these two running nodes (senders on the first, receivers on the
    /// second) instead of starting two; their CPU time is then not measured
    #[arg(long = "node", value_name = "URL", num_args = 1, requires = "cluster")]
    pub nodes: Vec<String>,
    /// With --cluster: offer this many messages a second in all (open loop, latency measured
    /// from when each message was due); without it, each sender keeps --window in flight
    #[arg(long, requires = "cluster")]
    pub rate: Option<u32>,
    /// With --cluster: measure heartbeats instead of messages: --pairs devices on node A each
    /// send HEARTBEAT (--rate in all a second, default 5000) and wait for the answer
    #[arg(long, requires = "cluster")]
    pub heartbeats: bool,
    /// With --cluster: one sender (on node A) writes to a group of this many members (the
    /// sender among them), the others alternately on node B and node A; CPU and Redis figures
    /// are then per delivery (one message to one member)
    #[arg(long, requires = "cluster", conflicts_with = "heartbeats", value_parser = clap::value_parser!(u16).range(2..))]
    pub group: Option<u16>,
    /// With --cluster: seconds of sending
    #[arg(long, default_value_t = 15, requires = "cluster")]
    pub duration: u64,
    /// With --cluster: the profile whose services (Redis, broker, MessageService) the nodes use
    #[arg(long, default_value = "node1", requires = "cluster")]
    pub profile: String,
    /// Directory of the profiles
    #[arg(long, value_name = "DIR", default_value = "config")]
    pub config_dir: PathBuf,
    /// With --cluster: where scripts/services.sh keeps its pid files, for the CPU time of
    /// Redis, the broker and the MessageService
    #[arg(
        long,
        value_name = "DIR",
        default_value = ".services",
        requires = "cluster"
    )]
    pub services_dir: PathBuf,
    /// Machine output
    #[arg(long)]
    pub json: bool,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.pairs == 0 || args.messages == 0 || args.window == 0 {
        bail!("--pairs, --messages and --window must be at least 1");
    }
    if args.cluster {
        return cluster::run(&args).await;
    }
    let mut spawned = Spawned::default();
    let url = if args.spawn {
        let spec = NodeSpec {
            profile: None,
            node_id: "bench",
            config_dir: &args.config_dir,
            env: UNLIMITED,
        };
        spawned.start(&spec).await?
    } else {
        args.url.clone()
    };
    let pid = spawned.pids().first().copied();
    let wait = Duration::from_secs(30);

    // Memory per idle connection (only for a node we started, whose process we can see), on
    // the fresh node: after the message run an allocator keeps freed memory for reuse, and
    // idle connections would fill it without growing the node.
    let mut memory = None;
    if let Some(pid) = pid {
        let before = rss_kib(pid);
        let mut idle = Vec::with_capacity(args.idle);
        for i in 0..args.idle {
            idle.push(Client::connect(&url, &format!("bench-idle{i}"), wait).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        if let (Some(b), Some(a)) = (before, after) {
            let per = if args.idle > 0 {
                (a.saturating_sub(b)) as f64 / args.idle as f64
            } else {
                0.0
            };
            memory = Some((b, a, per));
        }
        drop(idle);
        // The node lets their sessions go before the message run.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Throughput and latency.
    let mut pairs = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        let sender = Client::connect(&url, &format!("bench-s{i}"), wait).await?;
        let receiver = Client::connect(&url, &format!("bench-r{i}"), wait).await?;
        pairs.push((i, sender, receiver));
    }
    let cpu_before = pid.and_then(cluster::cpu_ticks);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut sender, mut receiver) in pairs {
        let (messages, window) = (args.messages, args.window);
        let to = format!("bench-r{i}");
        let receive = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            for _ in 0..messages {
                let f = receiver.wait_for("CHAT_MESSAGE", wait, |_| {}).await?;
                let sent: u128 = f["content"].as_str().unwrap_or("0").parse().unwrap_or(0);
                let now = started.elapsed().as_micros();
                latencies.push(Duration::from_micros(now.saturating_sub(sent) as u64));
            }
            Ok::<_, crate::client::ClientError>(latencies)
        });
        let send = tokio::spawn(async move {
            let mut in_flight = 0;
            for n in 0..messages {
                if in_flight == window {
                    sender.wait_for("MESSAGE_ACK", wait, |_| {}).await?;
                    in_flight -= 1;
                }
                let content = started.elapsed().as_micros().to_string();
                sender
                    .send_json(
                        &json!({"type": "CHAT_MESSAGE", "receiverId": to, "chatId": "bench",
                        "content": content, "tempMessageId": format!("b{n}")}),
                    )
                    .await?;
                in_flight += 1;
            }
            for _ in 0..in_flight {
                sender.wait_for("MESSAGE_ACK", wait, |_| {}).await?;
            }
            Ok::<_, crate::client::ClientError>(())
        });
        tasks.push((send, receive));
    }
    let mut latencies = Vec::with_capacity(args.pairs * args.messages);
    for (send, receive) in tasks {
        send.await?.context("a sender failed")?;
        latencies.extend(receive.await?.context("a receiver failed")?);
    }
    let elapsed = started.elapsed();
    // The node's CPU time per delivered message (only for a node we started).
    let cpu_us = match (cpu_before, pid.and_then(cluster::cpu_ticks)) {
        (Some(b), Some(a)) if !latencies.is_empty() => {
            Some((a - b) as f64 / cluster::TICKS_PER_SEC * 1e6 / latencies.len() as f64)
        }
        _ => None,
    };
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    let delivered = latencies.len();
    let rate = delivered as f64 / elapsed.as_secs_f64();

    spawned.stop().await;
    let report = json!({
        "url": url,
        "pairs": args.pairs,
        "messagesPerSender": args.messages,
        "window": args.window,
        "delivered": delivered,
        "elapsedSecs": elapsed.as_secs_f64(),
        "messagesPerSec": rate,
        "latencyMs": { "p50": at(0.5).as_secs_f64() * 1e3, "p99": at(0.99).as_secs_f64() * 1e3, "max": at(1.0).as_secs_f64() * 1e3 },
        "nodeCpuUsPerMessage": cpu_us,
        "memory": memory.map(|(b, a, per)| json!({ "rssBeforeKiB": b, "rssWithIdleKiB": a, "idleConnections": args.idle, "perConnectionKiB": per })),
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    let mut table = super::table(["measure", "value"]);
    table.add_row([
        "pairs x messages".to_string(),
        format!(
            "{} x {} (window {})",
            args.pairs, args.messages, args.window
        ),
    ]);
    table.add_row([
        "delivered".to_string(),
        format!("{delivered} in {:.2} s", elapsed.as_secs_f64()),
    ]);
    table.add_row(["throughput".to_string(), format!("{rate:.0} messages/s")]);
    table.add_row([
        "latency p50 / p99 / max".to_string(),
        format!("{:.2?} / {:.2?} / {:.2?}", at(0.5), at(0.99), at(1.0)),
    ]);
    if let Some(us) = cpu_us {
        table.add_row([
            "node CPU per delivered message".to_string(),
            format!("{us:.2} µs"),
        ]);
    }
    if let Some((b, a, per)) = memory {
        table.add_row([
            "node RSS before".to_string(),
            format!("{:.1} MiB", b as f64 / 1024.0),
        ]);
        table.add_row([
            format!("node RSS with {} idle connections", args.idle),
            format!("{:.1} MiB", a as f64 / 1024.0),
        ]);
        table.add_row([
            "memory per idle connection".to_string(),
            format!("{per:.1} KiB"),
        ]);
    }
    println!("{table}");
    Ok(())
}
