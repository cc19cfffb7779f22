//! `chatd bench --cluster`: the cross-node path, measured end to end. Two nodes of this binary
//! (the profile's settings, node ids `benchA` and `benchB`) on the services of
//! `scripts/services.sh`; every sender on the first node, its receiver on the second, so each
//! message is stored, routed through the broker and delivered by the other node.
//!
//! Open loop (`--rate`): messages are due on a fixed schedule whatever the node answers, and
//! latency counts from when a message was due, so a node that falls behind shows it in the
//! percentiles instead of slowing the senders down. Closed loop (no `--rate`): each sender
//! keeps `--window` messages in flight, which finds the maximum.
//!
//! Reported: delivered per second, latency, messages acknowledged but never delivered (lost)
//! and delivered twice (repeated), the CPU time of every process per delivered message (both
//! nodes, Redis, the broker, the MessageService, from `/proc`), and Redis commands per message
//! (`INFO commandstats`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::stages::Stages;
use super::{BenchArgs, UNLIMITED};
use crate::chat::ids::now_ms;
use crate::client::{Client, ClientError, ClientReader, ClientWriter, Incoming};
use crate::commands::spawn::{NodeSpec, Spawned};
use crate::commands::ConfigArgs;
use crate::config::Overrides;
use crate::redis_client::RedisClient;

/// How long after the last send a message may still arrive before it counts as lost.
const DRAIN: Duration = Duration::from_secs(15);
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// Clock ticks per second of `/proc/PID/stat` (USER_HZ, 100 on Linux).
pub(super) const TICKS_PER_SEC: f64 = 100.0;

/// What one pair's tasks share: how far the sender got, and whether its acks are all in.
#[derive(Default)]
struct PairState {
    sent: AtomicU64,
    sending_done: AtomicBool,
    acked: AtomicU64,
    acks_done: AtomicBool,
    /// By message number: when it was due, in µs from the start (for the ack's latency).
    due_us: std::sync::Mutex<Vec<u64>>,
}

/// One pair's outcome.
struct PairResult {
    /// By message number: acknowledged by the sender's node.
    acked: Vec<bool>,
    /// By message number: how many times the receiver got it.
    received: Vec<u32>,
    latencies: Vec<Duration>,
    /// From due to `MESSAGE_ACK`: the sending node's part (store, route, broker ack).
    ack_latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

/// A process whose CPU time is measured: one, or several counted as one (the masters of a
/// Redis Cluster).
struct Process {
    name: &'static str,
    pids: Vec<u32>,
}

/// utime + stime of `pids` together, in clock ticks; `None` without any, or when one is gone.
fn ticks_of(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu_ticks(pid)).sum()
}

/// utime + stime of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn pid_file(dir: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(dir.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The Redis processes the bench measures: the single Redis of `scripts/services.sh up`, or
/// with `redis.cluster` the masters of `scripts/services.sh cluster up` (`cluster-PORT/`).
fn redis_pids(dir: &Path, cluster: bool) -> Vec<u32> {
    if !cluster {
        return pid_file(dir, "redis").into_iter().collect();
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut nodes: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cluster-"))
        })
        .collect();
    nodes.sort();
    nodes.iter().filter_map(|n| pid_file(n, "redis")).collect()
}

/// What Redis has done so far: calls of every command (`INFO commandstats`), and its forks
/// (`total_forks`: AOF rewrites and RDB saves, each of which copies the whole dataset in a
/// child process while the bench runs: the tail latency of a run with one is not the same).
#[derive(Debug, Default, PartialEq)]
struct RedisWork {
    calls: BTreeMap<String, u64>,
    forks: u64,
}

async fn redis_work(redis: &RedisClient) -> anyhow::Result<RedisWork> {
    let info: redis::Value = redis
        .call("INFO all", |mut c| async move {
            redis::cmd("INFO").arg("all").query_async(&mut c).await
        })
        .await
        .map_err(anyhow::Error::msg)?;
    // A Redis Cluster answers from every master, node by node: their work is summed.
    let texts: Vec<String> = match info {
        redis::Value::Map(nodes) => nodes
            .into_iter()
            .map(|(_, text)| redis::from_owned_redis_value(text))
            .collect::<Result<_, _>>()?,
        text => vec![redis::from_owned_redis_value(text)?],
    };
    Ok(summed(&texts))
}

/// The work of several Redis servers (`INFO all` of each), added up.
fn summed(infos: &[String]) -> RedisWork {
    let mut sum = RedisWork::default();
    for work in infos.iter().map(|info| parse_info(info)) {
        for (command, calls) in work.calls {
            *sum.calls.entry(command).or_default() += calls;
        }
        sum.forks += work.forks;
    }
    sum
}

fn parse_info(info: &str) -> RedisWork {
    let calls = info
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect();
    let forks = info
        .lines()
        .find_map(|line| line.strip_prefix("total_forks:")?.trim().parse().ok())
        .unwrap_or(0);
    RedisWork { calls, forks }
}

/// Who a bench sender writes to: a user (its receiver) or a group.
#[derive(Clone)]
pub(super) enum To {
    User(String),
    Group(String),
}

impl To {
    fn frame(&self, content: &str, temp: &str) -> serde_json::Value {
        let mut f = json!({"type": "CHAT_MESSAGE", "content": content, "tempMessageId": temp});
        match self {
            To::User(u) => {
                f["receiverId"] = json!(u);
                f["chatId"] = json!("bench");
            }
            To::Group(g) => f["groupId"] = json!(g),
        }
        f
    }
}

fn chat_frame(to: &To, n: u64, due_us: u128) -> String {
    to.frame(&format!("{n}:{due_us}"), &format!("b{n}"))
        .to_string()
}

fn mark(v: &mut Vec<bool>, n: usize) {
    if v.len() <= n {
        v.resize(n + 1, false);
    }
    v[n] = true;
}

/// What the measured processes and Redis did over a window of a run: each process's CPU
/// ticks and Redis's counters, read at [`start`](Meter::start) and at [`stop`](Meter::stop).
/// The message bench and the heartbeat bench measure the same way.
struct Meter<'a> {
    processes: &'a [Process],
    cpu: Vec<Option<u64>>,
    redis: RedisWork,
}

/// A [`Meter`]'s window: CPU seconds per process (`None` without a pid), the calls of each
/// Redis command that ran (most first), and Redis's forks.
struct Usage {
    cpu_secs: Vec<(&'static str, Option<f64>)>,
    calls: Vec<(String, u64)>,
    forks: u64,
}

impl<'a> Meter<'a> {
    async fn start(processes: &'a [Process], redis: &RedisClient) -> anyhow::Result<Meter<'a>> {
        Ok(Meter {
            processes,
            cpu: processes.iter().map(|p| ticks_of(&p.pids)).collect(),
            redis: redis_work(redis).await?,
        })
    }

    async fn stop(self, redis: &RedisClient) -> anyhow::Result<Usage> {
        let after = redis_work(redis).await?;
        let cpu_secs = self
            .processes
            .iter()
            .zip(&self.cpu)
            .map(|(p, before)| {
                let ticks = before
                    .zip(ticks_of(&p.pids))
                    .map(|(b, a)| a.saturating_sub(b));
                (p.name, ticks.map(|t| t as f64 / TICKS_PER_SEC))
            })
            .collect();
        let mut calls: Vec<(String, u64)> = after
            .calls
            .iter()
            .map(|(k, n)| {
                let before = self.redis.calls.get(k).copied().unwrap_or(0);
                (k.clone(), n.saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        calls.sort_by_key(|c| std::cmp::Reverse(c.1));
        Ok(Usage {
            cpu_secs,
            calls,
            forks: after.forks.saturating_sub(self.redis.forks),
        })
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.pairs == 0 || args.window == 0 || args.duration == 0 || args.rate == Some(0) {
        bail!("--pairs, --window, --duration and --rate must be at least 1");
    }
    let layers = ConfigArgs {
        profile: Some(args.profile.clone()),
        config: None,
        config_dir: args.config_dir.clone(),
    };
    let config = layers.load(Overrides::default())?;
    if !config.kafka.is_cluster() {
        bail!(
            "profile {:?} names no [kafka] brokers: --cluster needs a cluster profile (node1) \
             and its services (scripts/services.sh up)",
            args.profile
        );
    }
    let redis = RedisClient::new(&config.redis)?;
    redis_work(&redis).await.with_context(|| {
        format!(
            "Redis at {} does not answer: start the services with scripts/services.sh up",
            config.redis.url
        )
    })?;

    let mut spawned = Spawned::default();
    let mut urls = args.nodes.clone();
    if !matches!(urls.len(), 0 | 2) {
        bail!("give two --node URLs (senders' node, then receivers' node), or none to start two");
    }
    // The receivers' node first: the senders' node then publishes to its new topic
    // generation from the start (see bus::kafka::topics).
    for node_id in ["benchB", "benchA"]
        .into_iter()
        .filter(|_| args.nodes.is_empty())
    {
        let spec = NodeSpec {
            profile: Some(&args.profile),
            node_id,
            config_dir: &args.config_dir,
            env: UNLIMITED,
        };
        urls.insert(0, spawned.start(&spec).await?);
    }
    let mut node_pids = spawned.pids();
    node_pids.reverse();
    let processes = [
        Process {
            name: "node A (senders)",
            pids: node_pids.first().copied().into_iter().collect(),
        },
        Process {
            name: "node B (receivers)",
            pids: node_pids.get(1).copied().into_iter().collect(),
        },
        Process {
            name: "Redis",
            pids: redis_pids(&args.services_dir, config.redis.cluster),
        },
        Process {
            name: "broker",
            pids: pid_file(&args.services_dir, "kafka").into_iter().collect(),
        },
        Process {
            name: "MessageService",
            pids: pid_file(&args.services_dir, "message-service")
                .into_iter()
                .collect(),
        },
    ];

    let run_id = now_ms() % 1_000_000_000;
    if args.heartbeats {
        return heartbeats(args, &urls[0], run_id, &processes, &redis, spawned).await;
    }
    // Each sender with whom it writes to and the devices that receive it.
    let mut pairs: Vec<(To, Client, Vec<Client>)> = Vec::with_capacity(args.pairs);
    if let Some(members) = args.group {
        pairs.push(super::group::join(&urls, run_id, members).await?);
    }
    for i in (0..args.pairs).filter(|_| args.group.is_none()) {
        let to = format!("bench{run_id}-r{i}");
        let sender =
            Client::connect(&urls[0], &format!("bench{run_id}-s{i}"), CONNECT_WAIT).await?;
        let receiver = Client::connect(&urls[1], &to, CONNECT_WAIT).await?;
        pairs.push((To::User(to), sender, vec![receiver]));
    }
    // One message per pair first, not counted: every path is up (presence written, the
    // producer knows the topic) before the clock starts.
    let warm = futures_util::future::join_all(pairs.iter_mut().map(|(to, s, rs)| async move {
        s.send_json(&to.frame("warm-up", "warm-up")).await?;
        s.wait_for("MESSAGE_ACK", CONNECT_WAIT, |_| {}).await?;
        for r in rs {
            r.wait_for("CHAT_MESSAGE", CONNECT_WAIT, |_| {}).await?;
        }
        Ok::<_, ClientError>(())
    }))
    .await;
    for w in warm {
        w.context("the warm-up message did not reach every receiver")?;
    }
    let senders = pairs.len();

    let stages_before = Stages::read(&urls[0]).await;
    let meter = Meter::start(&processes, &redis).await?;
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let delivered = Arc::new(AtomicU64::new(0));
    let pids: Vec<Vec<u32>> = processes.iter().map(|p| p.pids.clone()).collect();
    let sampler = tokio::spawn(sample(pids, delivered.clone(), end));
    let mut tasks = Vec::with_capacity(senders);
    for (to, sender, receivers) in pairs {
        let state = Arc::new(PairState::default());
        let window = Arc::new(Semaphore::new(args.window));
        let Client { writer, reader, .. } = sender;
        let pace = match args.rate {
            Some(rate) => {
                let every = Duration::from_secs_f64(senders as f64 / rate as f64);
                // Pairs out of phase, so that the offered load is smooth rather than all
                // pairs sending at the same instant.
                let offset = every.mul_f64(tasks.len() as f64 / senders as f64);
                Pace::Every { every, offset }
            }
            None => Pace::Window(window.clone()),
        };
        let send = tokio::spawn(send_loop(writer, to, pace, started, end, state.clone()));
        let acks = tokio::spawn(ack_loop(
            reader,
            window,
            started,
            end + DRAIN,
            state.clone(),
        ));
        let mut receiving = Vec::with_capacity(receivers.len());
        for receiver in receivers {
            // A receiver only reads: without heartbeats the node closes it as idle
            // (`server.idle_timeout_ms`, 90 s) and a long run counts the rest as lost.
            let every = receiver.heartbeat_interval();
            let heartbeat = tokio::spawn(keep_alive(receiver.writer, every));
            let receive = tokio::spawn(receive_loop(
                receiver.reader,
                started,
                end + DRAIN,
                state.clone(),
                delivered.clone(),
            ));
            receiving.push((receive, heartbeat));
        }
        tasks.push((send, acks, receiving));
    }
    // One result per receiving device: a group's members share their sender's acks (its
    // latencies and errors counted once).
    let mut results = Vec::with_capacity(tasks.len());
    for (send, acks, receiving) in tasks {
        send.await?.context("a sender failed")?;
        let (acked, mut ack_latencies, mut errors) = acks.await?;
        for (receive, heartbeat) in receiving {
            let (received, latencies, last) = receive.await?;
            heartbeat.abort();
            results.push((
                PairResult {
                    acked: acked.clone(),
                    received,
                    latencies,
                    ack_latencies: std::mem::take(&mut ack_latencies),
                    errors: std::mem::take(&mut errors),
                },
                last,
            ));
        }
    }
    let elapsed = results
        .iter()
        .filter_map(|(_, last)| *last)
        .max()
        .unwrap_or(end)
        .saturating_duration_since(started);
    let usage = meter.stop(&redis).await?;
    let stages = match (Stages::read(&urls[0]).await, stages_before) {
        (Some(after), Some(before)) => Some(after.since(&before)),
        _ => None,
    };
    spawned.stop().await;
    let drift = drift(&sampler.await?, &processes);

    let results: Vec<PairResult> = results.into_iter().map(|(r, _)| r).collect();
    let mut report = Report::new(&results, elapsed);
    if let Some(members) = args.group {
        // Each member counted the sender's acks: the group received each message once.
        report.acked /= (members - 1).max(1) as u64;
    }
    report.stages = stages;
    report.print(args, &usage.cpu_secs, &usage.calls, usage.forks, &drift)
}

/// `--heartbeats`: what a device's `HEARTBEAT` costs each process (a node records it in
/// presence and looks in the device's inbox for anything missed, then answers), measured as
/// messages are: `--pairs` devices on node A, `--rate` heartbeats a second in all.
async fn heartbeats(
    args: &BenchArgs,
    url: &str,
    run_id: i64,
    processes: &[Process],
    redis: &RedisClient,
    spawned: Spawned,
) -> anyhow::Result<()> {
    let rate = args.rate.unwrap_or(5000);
    let mut devices = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        devices.push(Client::connect(url, &format!("bench{run_id}-h{i}"), CONNECT_WAIT).await?);
    }
    let meter = Meter::start(processes, redis).await?;
    let started = Instant::now();
    let end = started + Duration::from_secs(args.duration);
    let every = Duration::from_secs_f64(args.pairs as f64 / rate as f64);
    let answered = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(i, mut device)| {
            let answered = answered.clone();
            // Devices out of phase, so that the load is smooth.
            let first = started + every.mul_f64(i as f64 / args.pairs as f64);
            tokio::spawn(async move {
                let mut due = first;
                while due < end {
                    tokio::time::sleep_until(due).await;
                    device
                        .send_json(&json!({"type": "HEARTBEAT", "content": "ping"}))
                        .await?;
                    device
                        .wait_for("HEARTBEAT_ACK", CONNECT_WAIT, |_| {})
                        .await?;
                    answered.fetch_add(1, Ordering::Relaxed);
                    due += every;
                }
                Ok::<_, ClientError>(())
            })
        })
        .collect();
    for task in tasks {
        task.await?.context("a device failed")?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let usage = meter.stop(redis).await?;
    spawned.stop().await;
    let n = answered.load(Ordering::Relaxed).max(1) as f64;
    let commands: u64 = usage.calls.iter().map(|(_, n)| n).sum();
    let cpu: Vec<(&str, Option<f64>)> = usage
        .cpu_secs
        .iter()
        .map(|(name, secs)| (*name, secs.map(|s| s * 1e6 / n)))
        .collect();
    if args.json {
        println!(
            "{}",
            json!({
                "mode": "heartbeats",
                "devices": args.pairs,
                "offeredPerSec": rate,
                "answered": n as u64,
                "answeredPerSec": n / elapsed,
                "cpuUsPerHeartbeat": cpu.iter().map(|(name, us)| (name.to_string(), json!(us))).collect::<serde_json::Map<_, _>>(),
                "redisCommandsPerHeartbeat": commands as f64 / n,
            })
        );
        return Ok(());
    }
    let mut table = crate::commands::table(["measure", "value"]);
    table.add_row([
        "load".to_string(),
        format!(
            "{} devices on node A, {rate} heartbeats/s offered, {} s",
            args.pairs, args.duration
        ),
    ]);
    table.add_row([
        "answered".to_string(),
        format!("{} in {elapsed:.2} s: {:.0}/s", n as u64, n / elapsed),
    ]);
    for (name, us) in cpu {
        let value = us.map_or("not measured (no pid)".to_string(), |us| {
            format!("{us:.1} µs/heartbeat")
        });
        table.add_row([format!("CPU {name}"), value]);
    }
    table.add_row([
        "Redis commands / heartbeat".to_string(),
        format!("{:.2}", commands as f64 / n),
    ]);
    println!("{table}");
    Ok(())
}

/// Every second while sending: messages delivered so far and each process's CPU ticks.
type Samples = Vec<(u64, Vec<Option<u64>>)>;

async fn sample(pids: Vec<Vec<u32>>, delivered: Arc<AtomicU64>, end: Instant) -> Samples {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() <= end {
        tick.tick().await;
        let cpu = pids.iter().map(|p| ticks_of(p)).collect();
        samples.push((delivered.load(Ordering::Relaxed), cpu));
    }
    samples
}

/// CPU per delivered message of each process in the first and the last fifth of the run:
/// a cost that grows with what was sent before shows as a ratio above 1.
fn drift(samples: &Samples, processes: &[Process]) -> Vec<(&'static str, f64, f64)> {
    let n = samples.len();
    if n < 6 {
        return Vec::new();
    }
    let fifth = (n / 5).max(1);
    let per_msg = |from: usize, to: usize, i: usize| -> Option<f64> {
        let (d0, c0) = &samples[from];
        let (d1, c1) = &samples[to];
        let msgs = d1.checked_sub(*d0).filter(|m| *m > 0)?;
        let ticks = c1[i]?.checked_sub(c0[i]?)?;
        Some(ticks as f64 / TICKS_PER_SEC * 1e6 / msgs as f64)
    };
    processes
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let first = per_msg(0, fifth, i)?;
            let last = per_msg(n - 1 - fifth, n - 1, i)?;
            Some((p.name, first, last))
        })
        .collect()
}

/// How a sender spaces its messages.
enum Pace {
    /// Open loop: one message every `every`, the first at `offset`, whatever the node answers.
    Every { every: Duration, offset: Duration },
    /// Closed loop: one permit per message in flight, returned by its ack.
    Window(Arc<Semaphore>),
}

async fn send_loop(
    mut writer: ClientWriter,
    to: To,
    pace: Pace,
    started: Instant,
    end: Instant,
    state: Arc<PairState>,
) -> Result<(), ClientError> {
    let mut n: u64 = 0;
    let result = loop {
        let due = match &pace {
            Pace::Every { every, offset } => {
                let due = started + *offset + every.mul_f64(n as f64);
                tokio::time::sleep_until(due).await;
                due
            }
            Pace::Window(window) => match window.acquire().await {
                Ok(permit) => {
                    permit.forget();
                    Instant::now()
                }
                Err(_) => break Ok(()),
            },
        };
        if due >= end {
            break Ok(());
        }
        let due_us = due.duration_since(started).as_micros();
        if let Ok(mut dues) = state.due_us.lock() {
            dues.push(due_us as u64);
        }
        let frame = chat_frame(&to, n, due_us);
        if let Err(e) = writer.send_text(&frame).await {
            break Err(e);
        }
        n += 1;
        state.sent.store(n, Ordering::Release);
    };
    state.sending_done.store(true, Ordering::Release);
    result
}

/// Counts the sender's acks (and errors) until every sent message has one, or `deadline`.
async fn ack_loop(
    mut reader: ClientReader,
    window: Arc<Semaphore>,
    started: Instant,
    deadline: Instant,
    state: Arc<PairState>,
) -> (Vec<bool>, Vec<Duration>, BTreeMap<String, u64>) {
    let mut acked = Vec::new();
    let mut latencies = Vec::new();
    let mut count = 0u64;
    let mut errors = BTreeMap::new();
    loop {
        let all_in = state.sending_done.load(Ordering::Acquire)
            && count >= state.sent.load(Ordering::Acquire);
        if all_in || Instant::now() >= deadline {
            break;
        }
        let frame = match reader.next(Duration::from_millis(100)).await {
            Ok(Incoming::Frame(f)) => f,
            Err(ClientError::Timeout(_)) => continue,
            Ok(Incoming::Closed { code, reason }) => {
                *errors.entry(format!("closed {code} {reason}")).or_insert(0) += 1;
                break;
            }
            Err(e) => {
                *errors.entry(format!("{e}")).or_insert(0) += 1;
                break;
            }
        };
        let temp = frame["tempMessageId"]
            .as_str()
            .and_then(|t| t.strip_prefix('b'));
        match (
            frame["type"].as_str(),
            temp.and_then(|t| t.parse::<usize>().ok()),
        ) {
            (Some("MESSAGE_ACK"), Some(n)) => {
                let due = state.due_us.lock().ok().and_then(|d| d.get(n).copied());
                if let Some(due) = due {
                    let due = started + Duration::from_micros(due);
                    latencies.push(Instant::now().saturating_duration_since(due));
                }
                mark(&mut acked, n);
                count += 1;
                window.add_permits(1);
            }
            (Some("ERROR"), n) => {
                let code = frame["code"].as_str().unwrap_or("?").to_string();
                *errors.entry(code).or_insert(0) += 1;
                if n.is_some() {
                    // A refused send frees its place in the window too.
                    count += 1;
                    window.add_permits(1);
                }
            }
            _ => {}
        }
    }
    state.acked.store(count, Ordering::Release);
    state.acks_done.store(true, Ordering::Release);
    window.close();
    (acked, latencies, errors)
}

/// Sends `HEARTBEAT` every `every` until aborted or the connection fails.
async fn keep_alive(mut writer: ClientWriter, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let ping = json!({"type": "HEARTBEAT", "content": "ping"});
        if writer.send_json(&ping).await.is_err() {
            return;
        }
    }
}

/// Records every message the receiver gets until it has all the acknowledged ones, or
/// `deadline`. Returns how often each arrived, the latencies, and when the last one came.
async fn receive_loop(
    mut reader: ClientReader,
    started: Instant,
    deadline: Instant,
    state: Arc<PairState>,
    delivered: Arc<AtomicU64>,
) -> (Vec<u32>, Vec<Duration>, Option<Instant>) {
    let mut received: Vec<u32> = Vec::new();
    let mut unique = 0u64;
    let mut latencies = Vec::new();
    let mut last = None;
    loop {
        let done = state.acks_done.load(Ordering::Acquire)
            && unique >= state.acked.load(Ordering::Acquire);
        if done || Instant::now() >= deadline {
            break;
        }
        let frame = match reader.next(Duration::from_millis(100)).await {
            Ok(Incoming::Frame(f)) => f,
            Err(ClientError::Timeout(_)) => continue,
            _ => break,
        };
        if frame["type"] != "CHAT_MESSAGE" {
            continue;
        }
        let Some((n, due_us)) = frame["content"].as_str().and_then(|c| c.split_once(':')) else {
            continue;
        };
        let (Ok(n), Ok(due_us)) = (n.parse::<usize>(), due_us.parse::<u64>()) else {
            continue;
        };
        let now = Instant::now();
        if received.len() <= n {
            received.resize(n + 1, 0);
        }
        received[n] += 1;
        if received[n] == 1 {
            unique += 1;
            delivered.fetch_add(1, Ordering::Relaxed);
            let due = started + Duration::from_micros(due_us);
            latencies.push(now.saturating_duration_since(due));
        }
        last = Some(now);
    }
    (received, latencies, last)
}

/// The `q` quantile of sorted latencies (zero when there are none).
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

/// What the run measured, before the processes' CPU is added.
struct Report {
    delivered: u64,
    acked: u64,
    lost: u64,
    repeated: u64,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    latencies: Vec<Duration>,
    ack_latencies: Vec<Duration>,
    /// Where node A's time went (`None` when its `/metrics` did not answer).
    stages: Option<Stages>,
}

impl Report {
    fn new(results: &[PairResult], elapsed: Duration) -> Self {
        let mut r = Report {
            delivered: 0,
            acked: 0,
            lost: 0,
            repeated: 0,
            errors: BTreeMap::new(),
            elapsed,
            latencies: Vec::new(),
            ack_latencies: Vec::new(),
            stages: None,
        };
        for p in results {
            for (n, acked) in p.acked.iter().enumerate() {
                let got = p.received.get(n).copied().unwrap_or(0);
                if *acked {
                    r.acked += 1;
                    if got == 0 {
                        r.lost += 1;
                    }
                }
            }
            for got in &p.received {
                if *got > 0 {
                    r.delivered += 1;
                    r.repeated += u64::from(got - 1);
                }
            }
            for (k, v) in &p.errors {
                *r.errors.entry(k.clone()).or_insert(0) += v;
            }
            r.latencies.extend_from_slice(&p.latencies);
            r.ack_latencies.extend_from_slice(&p.ack_latencies);
        }
        r.latencies.sort();
        r.ack_latencies.sort();
        r
    }

    fn percentile(&self, q: f64) -> Duration {
        percentile(&self.latencies, q)
    }

    fn print(
        &self,
        args: &BenchArgs,
        cpu: &[(&str, Option<f64>)],
        calls: &[(String, u64)],
        redis_forks: u64,
        drift: &[(&str, f64, f64)],
    ) -> anyhow::Result<()> {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let per_msg = |x: f64| x / self.delivered.max(1) as f64;
        let rate = self.delivered as f64 / secs;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (p50, p99, max) = (
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
        );
        let (ack50, ack99) = (
            percentile(&self.ack_latencies, 0.5),
            percentile(&self.ack_latencies, 0.99),
        );
        let total_calls: u64 = calls.iter().map(|(_, n)| n).sum();
        if args.json {
            let report = json!({
                "mode": if args.rate.is_some() { "open-loop" } else { "closed-loop" },
                "offeredPerSec": args.rate,
                "window": args.rate.is_none().then_some(args.window),
                "pairs": args.pairs,
                "groupMembers": args.group,
                "groupMessagesPerSec": args.group.map(|_| self.acked as f64 / secs),
                "durationSecs": args.duration,
                "acked": self.acked,
                "delivered": self.delivered,
                "lost": self.lost,
                "repeated": self.repeated,
                "errors": self.errors,
                "elapsedSecs": secs,
                "deliveredPerSec": rate,
                "latencyMs": { "p50": ms(p50), "p99": ms(p99), "max": ms(max) },
                "ackLatencyMs": { "p50": ms(ack50), "p99": ms(ack99) },
                "nodeAStages": self.stages.map(|s| s.json()),
                "cpu": cpu.iter().map(|(name, s)| json!({
                    "process": name,
                    "cores": s.map(|s| s / secs),
                    "usPerMessage": s.map(|s| per_msg(s) * 1e6),
                })).collect::<Vec<_>>(),
                "redisCommandsPerMessage": per_msg(total_calls as f64),
                "redisForks": redis_forks,
                "cpuDrift": drift.iter().map(|(name, first, last)| json!({
                    "process": name, "firstFifthUsPerMessage": first, "lastFifthUsPerMessage": last,
                })).collect::<Vec<_>>(),
                "redisCommands": calls.iter().map(|(k, n)| (k.clone(), json!(per_msg(*n as f64)))).collect::<serde_json::Map<_, _>>(),
            });
            println!("{report}");
        } else {
            let mut table = crate::commands::table(["measure", "value"]);
            let load = match args.rate {
                Some(r) => format!(
                    "open loop, {r} msg/s offered, {} pairs, {} s",
                    args.pairs, args.duration
                ),
                None => format!(
                    "closed loop, window {} x {} pairs, {} s",
                    args.window, args.pairs, args.duration
                ),
            };
            let load = match args.group {
                Some(n) => load.replace(
                    &format!("{} pairs", args.pairs),
                    &format!("one sender to a group of {n} members"),
                ),
                None => load,
            };
            table.add_row(["load".to_string(), load]);
            if args.group.is_some() {
                table.add_row([
                    "into the group".to_string(),
                    format!(
                        "{} messages: {:.0} msg/s",
                        self.acked,
                        self.acked as f64 / secs
                    ),
                ]);
            }
            table.add_row([
                "delivered (to each member: a delivery)".to_string(),
                format!("{} in {secs:.2} s: {rate:.0} msg/s", self.delivered),
            ]);
            table.add_row([
                "latency p50 / p99 / max".to_string(),
                format!("{:.2} / {:.2} / {:.2} ms", ms(p50), ms(p99), ms(max)),
            ]);
            table.add_row([
                "ack latency p50 / p99 (node A's part)".to_string(),
                format!("{:.2} / {:.2} ms", ms(ack50), ms(ack99)),
            ]);
            table.add_row([
                "acknowledged, lost, repeated".to_string(),
                format!("{} / {} / {}", self.acked, self.lost, self.repeated),
            ]);
            if let Some(stages) = &self.stages {
                table.add_row([
                    "node A: batch wait, store call, publish".to_string(),
                    format!(
                        "{}; {:.0} batches of {:.1} messages",
                        stages.line(),
                        stages.batches(),
                        self.acked as f64 / stages.batches().max(1.0)
                    ),
                ]);
            }
            if !self.errors.is_empty() {
                table.add_row(["errors".to_string(), format!("{:?}", self.errors)]);
            }
            for (name, s) in cpu {
                let value = match s {
                    Some(s) => format!("{:.2} cores, {:.1} µs/msg", s / secs, per_msg(*s) * 1e6),
                    None => "not measured (no pid)".to_string(),
                };
                table.add_row([format!("CPU {name}"), value]);
            }
            let top: Vec<String> = calls
                .iter()
                .take(6)
                .map(|(k, n)| format!("{k} {:.2}", per_msg(*n as f64)))
                .collect();
            table.add_row([
                "Redis commands / msg".to_string(),
                format!("{:.2} ({})", per_msg(total_calls as f64), top.join(", ")),
            ]);
            table.add_row([
                "Redis forks (AOF rewrite, RDB save)".to_string(),
                match redis_forks {
                    0 => "0".to_string(),
                    n => format!("{n}: the dataset was copied during the run (tail latency)"),
                },
            ]);
            for (name, first, last) in drift {
                table.add_row([
                    format!("CPU {name}, first → last fifth"),
                    format!(
                        "{first:.1} → {last:.1} µs/msg (x{:.2})",
                        last / first.max(1e-9)
                    ),
                ]);
            }
            println!("{table}");
        }
        if self.lost > 0 || self.repeated > 0 {
            bail!(
                "{} acknowledged messages were lost and {} repeated",
                self.lost,
                self.repeated
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_and_forks_are_read() {
        let info = "# Stats\r\ntotal_forks:5\r\nlatest_fork_usec:9203\r\n# Commandstats\r\ncmdstat_evalsha:calls=17032,usec=1,usec_per_call=0.1,rejected_calls=0\r\ncmdstat_ping:calls=3,usec=0\r\n";
        let work = parse_info(info);
        assert_eq!(work.calls.get("evalsha"), Some(&17032));
        assert_eq!(work.calls.get("ping"), Some(&3));
        assert_eq!(work.calls.len(), 2);
        assert_eq!(work.forks, 5);
        assert_eq!(parse_info("").forks, 0);
    }

    #[test]
    fn the_masters_of_a_redis_cluster_are_added_up() {
        let node = |evalsha: u64, forks: u64| {
            format!("total_forks:{forks}\r\ncmdstat_evalsha:calls={evalsha},usec=1\r\n")
        };
        let mut third = node(5, 0);
        third.push_str("cmdstat_zadd:calls=7,usec=1\r\n");
        let work = summed(&[node(100, 1), node(20, 2), third]);
        assert_eq!(work.calls.get("evalsha"), Some(&125));
        assert_eq!(work.calls.get("zadd"), Some(&7));
        assert_eq!(work.forks, 3);
    }

    #[test]
    fn cpu_of_this_process_is_read() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
