//! `chatd crossnode-test`: the seed's cross-node scenarios, and more, against two running
//! nodes (or two it spawns with `--spawn`); a table of every check with its latency; exit
//! non-zero on any failure. Made for CI.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::{json, Value};

use super::spawn::{NodeSpec, Spawned};
use crate::chat::ids::now_ms;
use crate::client::{chat_url_with_token, with_since, Client, ClientError};
use crate::config::{AuthMode, Overrides};
use crate::presence::{Presence, RedisPresence};

const WAIT: Duration = Duration::from_secs(10);
/// How long an expected frame may take before its check fails. Generous: on a loaded CI
/// machine the first cross-node message after two nodes start has twice taken over 10 s (the
/// cause is not found yet; see issue 9); the latency column shows how long each took.
const FRAME_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct CrossnodeArgs {
    /// The two nodes (default: the node1 and node2 profiles on this machine)
    #[arg(long = "node", value_name = "URL", num_args = 1)]
    pub nodes: Vec<String>,
    /// Start two nodes (profiles node1 and node2 on free ports) and stop them afterwards
    #[arg(long, conflicts_with = "nodes")]
    pub spawn: bool,
    /// Where Redis (to check presence directly) and the token secret (for nodes in auth mode
    /// token) are read from: this profile
    #[arg(long, default_value = "node1")]
    pub profile: String,
    /// Directory of the profiles
    #[arg(long, value_name = "DIR", default_value = "config")]
    pub config_dir: PathBuf,
    /// Machine output: one JSON object with every check
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Check {
    name: &'static str,
    ok: bool,
    latency_ms: f64,
    detail: String,
}

pub async fn run(args: CrossnodeArgs) -> anyhow::Result<()> {
    let layers = super::ConfigArgs {
        profile: Some(args.profile.clone()),
        config: None,
        config_dir: args.config_dir.clone(),
    };
    let config = layers.load(Overrides::default())?;
    let secret = (config.auth.mode == AuthMode::Token).then_some(config.auth.secret.as_str());
    let presence = RedisPresence::from_config(&config)?;

    let run_id = now_ms() % 1_000_000_000;
    let mut spawned = Spawned::default();
    let nodes = if args.spawn {
        let mut urls = Vec::new();
        for (profile, n) in [("node1", 1), ("node2", 2)] {
            let node_id = format!("xn{run_id}-{n}");
            let spec = NodeSpec {
                profile: Some(profile),
                node_id: &node_id,
                config_dir: &args.config_dir,
                env: &[],
            };
            urls.push(spawned.start(&spec).await?);
        }
        urls
    } else if args.nodes.is_empty() {
        vec![
            "ws://127.0.0.1:9430".to_string(),
            "ws://127.0.0.1:9431".to_string(),
        ]
    } else if args.nodes.len() == 2 {
        args.nodes.clone()
    } else {
        bail!("give exactly two --node URLs (or none for the node1/node2 profiles, or --spawn)");
    };

    let bar = if std::io::stderr().is_terminal() && std::env::var_os("CI").is_none() && !args.json {
        let bar = ProgressBar::new(STEPS as u64);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}") {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let checks = scenarios(&nodes, secret, &presence, &format!("xn{run_id}"), &bar).await;
    bar.finish_and_clear();
    let failed = checks.iter().filter(|c| !c.ok).count();
    if failed > 0 && args.spawn {
        // What the nodes said, for a failure that does not happen again on demand.
        eprintln!("{}", spawned.log_tails(80));
    }
    spawned.stop().await;

    if args.json {
        println!(
            "{}",
            json!({ "nodes": nodes, "passed": failed == 0, "checks": checks })
        );
    } else {
        println!("{}", table(&checks));
        println!("nodes: {} and {}", nodes[0], nodes[1]);
    }
    if failed > 0 {
        bail!("{failed} of {} cross-node checks failed", checks.len());
    }
    Ok(())
}

fn table(checks: &[Check]) -> Table {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    if !std::io::stdout().is_terminal() {
        table.force_no_tty();
    } else {
        table.enforce_styling();
    }
    table.set_header(["check", "result", "latency", "detail"]);
    for c in checks {
        let result = if c.ok {
            comfy_table::Cell::new("pass").fg(comfy_table::Color::Green)
        } else {
            comfy_table::Cell::new("FAIL").fg(comfy_table::Color::Red)
        };
        table.add_row(vec![
            comfy_table::Cell::new(c.name),
            result,
            comfy_table::Cell::new(format!("{:.1} ms", c.latency_ms)),
            comfy_table::Cell::new(&c.detail),
        ]);
    }
    table
}

const STEPS: usize = 11;

/// Records one check: `f` returns the detail on success or the reason on failure.
async fn check<F, Fut>(checks: &mut Vec<Check>, bar: &ProgressBar, name: &'static str, f: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    bar.set_message(name);
    let started = Instant::now();
    let result = f().await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(e) => (false, e),
    };
    checks.push(Check {
        name,
        ok,
        latency_ms,
        detail,
    });
    bar.inc(1);
}

/// Connects `user`, with a token minted from `secret` when the nodes run in auth mode token.
async fn connect(node: &str, user: &str, secret: Option<&str>) -> Result<Client, String> {
    connect_since(node, user, secret, None).await
}

/// [`connect`], asking for a replay of the inbox after `since`.
async fn connect_since(
    node: &str,
    user: &str,
    secret: Option<&str>,
    since: Option<u64>,
) -> Result<Client, String> {
    let token = secret.map(|secret| crate::auth::mint(secret, user, 600, now_ms() / 1000));
    let mut url = chat_url_with_token(node, user, token.as_deref());
    if let Some(since) = since {
        url = with_since(&url, since);
    }
    Client::connect_url(&url, WAIT)
        .await
        .map_err(|e| e.to_string())
}

/// The next frame of `kind`, skipping heartbeat acks and other frames.
async fn frame(client: &mut Client, kind: &str) -> Result<Value, String> {
    client
        .wait_for(kind, FRAME_WAIT, |_| {})
        .await
        .map_err(|e| match e {
            ClientError::Timeout(_) => format!("no {kind} within {FRAME_WAIT:?}"),
            e => e.to_string(),
        })
}

fn chat(to: &str, content: &str, temp: &str) -> Value {
    json!({"type": "CHAT_MESSAGE", "receiverId": to, "chatId": "crossnode", "content": content, "tempMessageId": temp})
}

/// The query that says who is acting over REST, as a WebSocket would: a token minted from
/// `secret` in auth mode token, else `userId`.
fn acting_as(user: &str, secret: Option<&str>) -> String {
    match secret {
        Some(secret) => format!(
            "token={}",
            crate::auth::mint(secret, user, 600, now_ms() / 1000)
        ),
        None => format!("userId={user}"),
    }
}

/// alice (on node 1) makes a group of bob and dave on node 2 and carol on node 1, sends it two
/// messages, and each member's device gets the first once, then the second (a repeat of the
/// first would come between).
async fn group_scenario(
    nodes: &[String],
    secret: Option<&str>,
    prefix: &str,
    alice: &mut Client,
) -> Result<String, String> {
    let alice_id = format!("{prefix}-alice");
    let group = format!("{prefix}-group");
    let members = ["gbob", "gcarol", "gdave"].map(|m| format!("{prefix}-{m}"));
    let body = json!({"groupId": group, "members": members}).to_string();
    let path = format!("/api/groups?{}", acting_as(&alice_id, secret));
    let (status, answer) =
        crate::http::send(&nodes[0], hyper::Method::POST, &path, Some(&body), WAIT)
            .await
            .map_err(|e| e.to_string())?;
    if status != 201 {
        return Err(format!("creating the group answered {status}: {answer}"));
    }
    let where_ = [&nodes[1], &nodes[0], &nodes[1]];
    let mut devices = Vec::new();
    for (member, node) in members.iter().zip(where_) {
        devices.push((member, connect(node, member, secret).await?));
    }
    let mut ids = Vec::new();
    for (i, content) in ["to the group", "again"].into_iter().enumerate() {
        let send = json!({"type": "CHAT_MESSAGE", "groupId": group, "content": content, "tempMessageId": format!("xg{i}")});
        alice.send_json(&send).await.map_err(|e| e.to_string())?;
        let ack = frame(alice, "MESSAGE_ACK").await?;
        if i == 0 && ack["route"] != "local+remote" {
            return Err(format!("route is {} (expected local+remote)", ack["route"]));
        }
        ids.push(ack["messageId"].clone());
    }
    for (member, device) in &mut devices {
        for (id, content) in ids.iter().zip(["to the group", "again"]) {
            let m = frame(device, "CHAT_MESSAGE").await?;
            if m["messageId"] != *id || m["content"] != content || m["groupId"] != group.as_str() {
                return Err(format!("{member} expected {content:?} ({id}), got {m}"));
            }
        }
    }
    for (_, device) in devices {
        device.close().await;
    }
    Ok(
        "3 members, on node 2, 1, 2: each got 2 messages once, in order (route local+remote)"
            .into(),
    )
}

async fn node_ids(presence: &RedisPresence, user: &str) -> Result<BTreeSet<String>, String> {
    let devices = presence.devices(user).await.map_err(|e| e.to_string())?;
    Ok(devices.into_iter().map(|d| d.node_id).collect())
}

async fn scenarios(
    nodes: &[String],
    secret: Option<&str>,
    presence: &RedisPresence,
    prefix: &str,
    bar: &ProgressBar,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let (alice, bob, carol) = (
        format!("{prefix}-alice"),
        format!("{prefix}-bob"),
        format!("{prefix}-carol"),
    );

    let mut clients = Vec::new();
    let mut node_names = Vec::new();
    check(
        &mut checks,
        bar,
        "connect: alice on node 1, bob on node 2",
        || async {
            let a = connect(&nodes[0], &alice, secret).await?;
            let b = connect(&nodes[1], &bob, secret).await?;
            let (n1, n2) = (
                a.welcome["nodeId"].as_str().unwrap_or("").to_string(),
                b.welcome["nodeId"].as_str().unwrap_or("").to_string(),
            );
            if n1 == n2 {
                return Err(format!("both URLs are the same node {n1:?}"));
            }
            node_names = vec![n1.clone(), n2.clone()];
            clients.push(a);
            clients.push(b);
            Ok(format!("node 1 is {n1}, node 2 is {n2}"))
        },
    )
    .await;
    if clients.len() < 2 {
        return checks;
    }
    let (mut a, mut b) = (clients.remove(0), clients.remove(0));
    let (n1, n2) = (node_names[0].clone(), node_names[1].clone());

    let mut message_id = Value::Null;
    // The last seq bob's device saw, for the catch-up check.
    let mut bob_seen = 0u64;
    check(
        &mut checks,
        bar,
        "scenario 1: message node 1 -> node 2 through the broker",
        || async {
            a.send_json(&chat(&bob, "hello across nodes", "x1"))
                .await
                .map_err(|e| e.to_string())?;
            let ack = frame(&mut a, "MESSAGE_ACK").await?;
            let m = frame(&mut b, "CHAT_MESSAGE").await.map_err(|e| {
                format!(
                    "{e}; the sender's ack said route {}, remoteFailed {}",
                    ack["route"], ack["remoteFailed"]
                )
            })?;
            bob_seen = bob_seen.max(m["seq"].as_u64().unwrap_or(0));
            if ack["route"] != "remote" {
                return Err(format!("route is {} (expected remote)", ack["route"]));
            }
            if m["messageId"] != ack["messageId"] || m["content"] != "hello across nodes" {
                return Err(format!("bob got {m}"));
            }
            message_id = ack["messageId"].clone();
            Ok(format!(
                "route remote, message {}",
                ack["messageId"].as_str().unwrap_or("")
            ))
        },
    )
    .await;

    check(&mut checks, bar, "scenario 2: read receipt node 2 -> node 1", || async {
        if message_id.is_null() {
            return Err("no message from scenario 1 to mark read".into());
        }
        b.send_json(&json!({"type": "READ_RECEIPT", "chatId": "crossnode", "messageId": message_id, "receiverId": alice}))
            .await
            .map_err(|e| e.to_string())?;
        let r = frame(&mut a, "READ_RECEIPT").await?;
        if r["messageId"] != message_id || r["readerId"] != bob.as_str() {
            return Err(format!("alice got {r}"));
        }
        Ok("alice was told bob read it".into())
    })
    .await;

    let mut carol_devices = Vec::new();
    check(
        &mut checks,
        bar,
        "scenario 3: one user with devices on both nodes gets it on both",
        || async {
            carol_devices.push(connect(&nodes[0], &carol, secret).await?);
            carol_devices.push(connect(&nodes[1], &carol, secret).await?);
            a.send_json(&chat(&carol, "to all your devices", "x3"))
                .await
                .map_err(|e| e.to_string())?;
            let ack = frame(&mut a, "MESSAGE_ACK").await?;
            for (i, device) in carol_devices.iter_mut().enumerate() {
                let m = frame(device, "CHAT_MESSAGE")
                    .await
                    .map_err(|e| format!("carol's device on node {}: {e}", i + 1))?;
                if m["messageId"] != ack["messageId"] {
                    return Err(format!("carol's device on node {} got {m}", i + 1));
                }
            }
            if ack["route"] != "local+remote" {
                return Err(format!("route is {} (expected local+remote)", ack["route"]));
            }
            Ok("both devices, route local+remote".into())
        },
    )
    .await;

    check(&mut checks, bar, "typing node 1 -> node 2", || async {
        a.send_json(&json!({"type": "TYPING", "receiverId": bob, "chatId": "crossnode", "content": "typing"}))
            .await
            .map_err(|e| e.to_string())?;
        let t = frame(&mut b, "TYPING").await?;
        if t["senderId"] != alice.as_str() {
            return Err(format!("bob got {t}"));
        }
        Ok("bob saw alice typing".into())
    })
    .await;

    let mut alice2 = None;
    check(
        &mut checks,
        bar,
        "sender's other device on node 2 gets the copy",
        || async {
            let mut second = connect(&nodes[1], &alice, secret).await?;
            a.send_json(&chat(&bob, "copy me", "x5"))
                .await
                .map_err(|e| e.to_string())?;
            let ack = frame(&mut a, "MESSAGE_ACK").await?;
            let copy = frame(&mut second, "CHAT_MESSAGE").await?;
            let to_bob = frame(&mut b, "CHAT_MESSAGE").await?;
            bob_seen = bob_seen.max(to_bob["seq"].as_u64().unwrap_or(0));
            if copy["messageId"] != ack["messageId"] || copy["senderId"] != alice.as_str() {
                return Err(format!("alice's second device got {copy}"));
            }
            alice2 = Some(second);
            Ok("copy arrived on node 2".into())
        },
    )
    .await;

    check(
        &mut checks,
        bar,
        "Redis records every user on the right nodes",
        || async {
            let want = |v: &[&String]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
            for (user, expected) in [
                (&alice, want(&[&n1, &n2])),
                (&bob, want(&[&n2])),
                (&carol, want(&[&n1, &n2])),
            ] {
                let got = node_ids(presence, user).await?;
                if got != expected {
                    return Err(format!(
                        "{user} is on {got:?} in Redis, expected {expected:?}"
                    ));
                }
            }
            Ok(format!(
                "{alice}: {n1}+{n2}, {bob}: {n2}, {carol}: {n1}+{n2}"
            ))
        },
    )
    .await;

    check(
        &mut checks,
        bar,
        "a user who disconnects is offline everywhere",
        || async {
            b.close().await;
            let path = format!("/api/chat/online/status/{bob}");
            let deadline = Instant::now() + WAIT;
            loop {
                let mut offline = 0;
                for node in nodes {
                    let (status, body) = crate::http::get(node, &path, WAIT)
                        .await
                        .map_err(|e| e.to_string())?;
                    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    if status == 200 && v["online"] == false {
                        offline += 1;
                    }
                }
                if offline == nodes.len() && node_ids(presence, &bob).await?.is_empty() {
                    return Ok("offline on both nodes and in Redis".into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{bob} still reads online {WAIT:?} after disconnecting"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;

    check(
        &mut checks,
        bar,
        "bob, away, gets what he missed on the other node, in order",
        || async {
            let missed = 3;
            for i in 1..=missed {
                a.send_json(&chat(&bob, &format!("while away {i}"), &format!("x8-{i}")))
                    .await
                    .map_err(|e| e.to_string())?;
                frame(&mut a, "MESSAGE_ACK").await?;
            }
            let mut back = connect_since(&nodes[0], &bob, secret, Some(bob_seen)).await?;
            for i in 1..=missed {
                let m = frame(&mut back, "CHAT_MESSAGE").await?;
                let want = bob_seen + i;
                if m["seq"] != want || m["content"] != format!("while away {i}").as_str() {
                    return Err(format!("expected seq {want} \"while away {i}\", got {m}"));
                }
            }
            let synced = frame(&mut back, "SYNCED").await?;
            if synced["seq"] != bob_seen + missed {
                return Err(format!(
                    "SYNCED at {} (expected {})",
                    synced["seq"],
                    bob_seen + missed
                ));
            }
            back.close().await;
            Ok(format!(
                "seq {}..{} replayed from the store on node 1, then SYNCED",
                bob_seen + 1,
                bob_seen + missed
            ))
        },
    )
    .await;

    check(
        &mut checks,
        bar,
        "history of the chat, paged back on node 2; refused to a stranger on node 1",
        || async {
            let mut back = connect(&nodes[1], &bob, secret).await?;
            let page = |before: Option<&str>, limit: u64| {
                let mut ask = json!({"type": "HISTORY", "chatId": "crossnode", "limit": limit});
                if let Some(before) = before {
                    ask["before"] = json!(before);
                }
                ask
            };
            back.send_json(&page(None, 2))
                .await
                .map_err(|e| e.to_string())?;
            let first = frame(&mut back, "HISTORY").await?;
            let contents = |p: &Value| -> Vec<String> {
                p["messages"]
                    .as_array()
                    .map(|ms| {
                        ms.iter()
                            .map(|m| m["content"].as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            if contents(&first) != ["while away 3", "while away 2"] || first["more"] != true {
                return Err(format!("the newest page is {first}"));
            }
            let last = first["messages"][1]["messageId"]
                .as_str()
                .unwrap_or("")
                .to_string();
            back.send_json(&page(Some(&last), 10))
                .await
                .map_err(|e| e.to_string())?;
            let rest = frame(&mut back, "HISTORY").await?;
            if contents(&rest) != ["while away 1", "copy me", "hello across nodes"]
                || rest["more"] != false
            {
                return Err(format!("the page before {last} is {rest}"));
            }
            back.close().await;
            let stranger = format!("{prefix}-eve");
            let mut eve = connect(&nodes[0], &stranger, secret).await?;
            eve.send_json(&page(None, 10))
                .await
                .map_err(|e| e.to_string())?;
            let refused = frame(&mut eve, "ERROR").await?;
            eve.close().await;
            if refused["code"] != "FORBIDDEN" {
                return Err(format!("a stranger asking for the history got {refused}"));
            }
            Ok("5 messages newest first in two pages, FORBIDDEN to a stranger".into())
        },
    )
    .await;

    check(
        &mut checks,
        bar,
        "group: members on both nodes get a group message once",
        || async { group_scenario(nodes, secret, prefix, &mut a).await },
    )
    .await;

    a.close().await;
    if let Some(c) = alice2 {
        c.close().await;
    }
    for c in carol_devices {
        c.close().await;
    }
    checks
}
