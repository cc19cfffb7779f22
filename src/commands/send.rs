//! `chatd send`: sends one message (or `--count N`, pipelined), waits for every
//! `MESSAGE_ACK`, prints the message ids and routes; any `ERROR` or timeout exits non-zero.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{default_chat_id, DEFAULT_URL};
use crate::chat::ids::now_ms;
use crate::client::Client;

/// Messages sent ahead of their acks, at most; the window starts smaller, grows with acks and
/// halves on `RATE_LIMITED` (so a run of refusals never looks like a flood to the node).
const MAX_WINDOW: usize = 64;
const START_WINDOW: usize = 8;

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Sender user id
    #[arg(long)]
    pub from: String,
    /// Receiver user id
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    pub to: Option<String>,
    /// A group to send to instead (its id is the chat's); the sender must be a member
    #[arg(long)]
    pub group: Option<String>,
    /// Chat id (default: the two user ids, sorted, joined by _)
    #[arg(long, conflicts_with = "group")]
    pub chat: Option<String>,
    /// How many messages to send (each gets " #i" appended when more than one)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// The node to connect to
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// A token for nodes in auth mode token (see `chatd token`)
    #[arg(long)]
    pub token: Option<String>,
    /// Seconds to wait for the connection and for each ack
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub timeout: f64,
    /// One JSON line per ack instead of text
    #[arg(long)]
    pub json: bool,
    /// The message text
    pub text: String,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.text.trim().is_empty() {
        bail!("the message text is empty: give the text to send as the last argument");
    }
    let wait = Duration::from_secs_f64(args.timeout.max(0.1));
    let mut client = Client::connect_with_token(&args.url, &args.from, args.token.as_deref(), wait)
        .await
        .context("connect failed")?;
    // No faster than the node accepts (a burst of refusals ends in a close, 1008); a send
    // refused all the same is sent again below.
    client.pace_to_node_limit();
    let chat = match (&args.chat, &args.to) {
        (Some(chat), _) => chat.clone(),
        (None, Some(to)) => default_chat_id(&args.from, to),
        (None, None) => String::new(),
    };
    let run_id = now_ms();
    let count = args.count as usize;
    let bar = progress(count);

    let mut pending: HashMap<String, (usize, Instant)> = HashMap::new();
    let mut sent = 0usize;
    let mut routes: HashMap<String, usize> = HashMap::new();
    let mut latencies = Vec::with_capacity(count);
    let mut window = START_WINDOW;
    while sent < count || !pending.is_empty() {
        while sent < count && pending.len() < window {
            sent += 1;
            let temp = format!("send-{run_id}-{sent}");
            client
                .send_json(&message(&args, &chat, sent, &temp))
                .await?;
            pending.insert(temp, (sent, Instant::now()));
        }
        let frame = client
            .next_frame(wait)
            .await
            .context("waiting for MESSAGE_ACK")?;
        let temp = frame["tempMessageId"].as_str().unwrap_or_default();
        match frame["type"].as_str() {
            Some("MESSAGE_ACK") => {
                let Some((n, at)) = pending.remove(temp) else {
                    continue;
                };
                window = (window + 1).min(MAX_WINDOW);
                let route = frame["route"].as_str().unwrap_or("?").to_string();
                latencies.push(at.elapsed());
                if args.json {
                    println!(
                        "{}",
                        json!({"n": n, "messageId": frame["messageId"], "tempMessageId": temp,
                        "route": route, "timestamp": frame["timestamp"]})
                    );
                } else if count <= 20 {
                    bar.suspend(|| {
                        println!(
                            "{} route={route}",
                            frame["messageId"].as_str().unwrap_or("?")
                        )
                    });
                }
                *routes.entry(route).or_default() += 1;
                bar.inc(1);
            }
            Some("ERROR") if frame["code"] == "RATE_LIMITED" && pending.contains_key(temp) => {
                // Over the node's rate limit: send the same message again (same
                // tempMessageId, so never twice) after a pause.
                let (n, _) = pending[temp];
                window = (window / 2).max(1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                client.send_json(&message(&args, &chat, n, temp)).await?;
            }
            Some("ERROR") => {
                bar.abandon();
                let which = pending
                    .get(temp)
                    .map(|(n, _)| format!("message #{n}"))
                    .unwrap_or("a message".into());
                bail!(
                    "{which} was refused: {}: {}",
                    frame["code"].as_str().unwrap_or("?"),
                    frame["message"].as_str().unwrap_or("")
                );
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    if count > 20 && !args.json {
        println!("{}", summary(count, routes, latencies));
    }
    client.close().await;
    Ok(())
}

/// The `n`th message of the run (" #n" appended when there are several).
fn message(args: &SendArgs, chat: &str, n: usize, temp: &str) -> serde_json::Value {
    let content = if args.count > 1 {
        format!("{} #{n}", args.text)
    } else {
        args.text.clone()
    };
    let mut frame = json!({
        "type": "CHAT_MESSAGE",
        "content": content,
        "timestamp": now_ms(),
        "tempMessageId": temp,
    });
    match &args.group {
        Some(group) => frame["groupId"] = json!(group),
        None => {
            frame["receiverId"] = json!(args.to);
            frame["chatId"] = json!(chat);
        }
    }
    frame
}

/// Routes and ack latency of a `--count` run, as a table.
fn summary(count: usize, routes: HashMap<String, usize>, mut latencies: Vec<Duration>) -> Table {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    let mut routes: Vec<_> = routes.into_iter().collect();
    routes.sort();
    let mut table = super::table(["acknowledged", "routes", "ack p50", "ack p99", "ack max"]);
    let routes: Vec<String> = routes.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    table.add_row([
        count.to_string(),
        routes.join(", "),
        format!("{:.1?}", at(0.5)),
        format!("{:.1?}", at(0.99)),
        format!("{:.1?}", at(1.0)),
    ]);
    table
}

/// A progress bar for many messages on a terminal; hidden otherwise (scripts, CI).
fn progress(count: usize) -> ProgressBar {
    if count <= 20 || !std::io::stderr().is_terminal() || std::env::var_os("CI").is_some() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(count as u64);
    if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} acked {per_sec}") {
        bar.set_style(style);
    }
    bar
}
