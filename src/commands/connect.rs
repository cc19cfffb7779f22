//! `chatd connect`: a terminal chat client. On a terminal a person types `@bob hello`,
//! `/read ID`, `/typing bob`, `/quit`; with `--json` (or stdin not a terminal) every stdin line
//! is sent as a raw frame and every received frame is printed as one JSON line. Heartbeats
//! are sent by the client itself.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::{default_chat_id, DEFAULT_URL};
use crate::chat::ids::now_ms;
use crate::client::{Client, ClientWriter, Incoming};

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Your user id
    #[arg(long)]
    pub user: String,
    /// The node to connect to
    #[arg(long, default_value = DEFAULT_URL)]
    pub url: String,
    /// A token for nodes in auth mode token (see `chatd token`)
    #[arg(long)]
    pub token: Option<String>,
    /// Raw JSON frames in on stdin, one JSON line out per received frame (the default when
    /// stdin is not a terminal)
    #[arg(long, conflicts_with = "interactive")]
    pub json: bool,
    /// The human mode (`@bob hello`, `/read ID`, ...) even when stdin is not a terminal
    #[arg(long)]
    pub interactive: bool,
    /// Chat id for messages you send (default: the two user ids, sorted, joined by _)
    #[arg(long)]
    pub chat: Option<String>,
    /// After stdin ends, keep printing received frames this many seconds before closing
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub linger: f64,
}

/// What the interactive client remembers to answer `/read ID`.
struct Seen {
    chat_id: String,
    sender_id: String,
}

pub async fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let json_mode = args.json || (!args.interactive && !std::io::stdin().is_terminal());
    let wait = Duration::from_secs(10);
    let mut client = Client::connect_with_token(&args.url, &args.user, args.token.as_deref(), wait)
        .await
        .context("connect failed")?;
    if json_mode {
        println!("{}", client.welcome);
    } else {
        println!(
            "connected to node {} as {} (connection {}). Type /help for commands.",
            client.welcome["nodeId"].as_str().unwrap_or("?"),
            args.user,
            client.connection_id()
        );
    }

    let (lines_tx, mut lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });

    let mut heartbeat = tokio::time::interval(client.heartbeat_interval());
    heartbeat.tick().await;
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut temp_seq = 0u64;
    let mut stdin_open = true;
    let linger = Duration::from_secs_f64(args.linger.max(0.0));
    let mut deadline: Option<tokio::time::Instant> = None;
    let wait_forever = Duration::from_secs(365 * 24 * 3600);

    loop {
        let until_deadline = deadline
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
            .unwrap_or(wait_forever);
        tokio::select! {
            incoming = client.reader.next(until_deadline) => match incoming {
                Ok(Incoming::Frame(frame)) => {
                    if json_mode {
                        println!("{frame}");
                    } else {
                        print_frame(&frame, &args.user, &mut seen);
                    }
                }
                Ok(Incoming::Closed { code, reason }) => {
                    eprintln!("connection closed by the server: {code} {reason}");
                    anyhow::ensure!(code == 1000, "closed by the server with {code}: {reason}");
                    return Ok(());
                }
                Err(crate::client::ClientError::Timeout(_)) => break,
                Err(e) => return Err(e).context("connection lost"),
            },
            line = lines.recv(), if stdin_open => match line {
                Some(line) => {
                    let quit = if json_mode {
                        send_raw_line(&mut client.writer, &line).await?;
                        false
                    } else {
                        handle_command(&mut client.writer, &args, &line, &seen, &mut temp_seq).await?
                    };
                    if quit {
                        break;
                    }
                }
                None => {
                    stdin_open = false;
                    deadline = Some(tokio::time::Instant::now() + linger);
                }
            },
            _ = heartbeat.tick() => {
                client.writer.send_json(&json!({"type": "HEARTBEAT", "content": "ping"})).await?;
            }
        }
    }
    client.close().await;
    Ok(())
}

async fn send_raw_line(writer: &mut ClientWriter, line: &str) -> anyhow::Result<()> {
    let line = line.trim();
    if !line.is_empty() {
        writer.send_text(line).await?;
    }
    Ok(())
}

/// One line a person typed. Returns true for `/quit`.
async fn handle_command(
    writer: &mut ClientWriter,
    args: &ConnectArgs,
    line: &str,
    seen: &HashMap<String, Seen>,
    temp_seq: &mut u64,
) -> anyhow::Result<bool> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(false);
    }
    if let Some(rest) = line.strip_prefix('@') {
        let Some((to, text)) = rest.split_once(char::is_whitespace) else {
            eprintln!("usage: @user message");
            return Ok(false);
        };
        *temp_seq += 1;
        let chat = args
            .chat
            .clone()
            .unwrap_or_else(|| default_chat_id(&args.user, to));
        writer
            .send_json(&json!({
                "type": "CHAT_MESSAGE",
                "receiverId": to,
                "chatId": chat,
                "content": text.trim(),
                "timestamp": now_ms(),
                "tempMessageId": format!("cli-{}-{}", now_ms(), temp_seq),
            }))
            .await?;
        return Ok(false);
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("/quit"), ..) => return Ok(true),
        (Some("/help"), ..) => print_help(),
        (Some("/read"), Some(id), _) => match seen.get(id) {
            Some(m) => {
                writer
                    .send_json(&json!({
                        "type": "READ_RECEIPT",
                        "chatId": m.chat_id,
                        "messageId": id,
                        "receiverId": m.sender_id,
                    }))
                    .await?
            }
            None => {
                eprintln!("no message {id} received in this session; /read takes an id shown above")
            }
        },
        (Some("/typing"), Some(to), stop) => {
            let chat = args
                .chat
                .clone()
                .unwrap_or_else(|| default_chat_id(&args.user, to));
            let content = if stop == Some("stop") {
                "stop_typing"
            } else {
                "typing"
            };
            writer
                .send_json(&json!({"type": "TYPING", "receiverId": to, "chatId": chat, "content": content}))
                .await?
        }
        _ => eprintln!("unknown input {line:?}; type /help"),
    }
    Ok(false)
}

fn print_help() {
    println!(
        "  @USER TEXT        send TEXT to USER\n  \
         /read MESSAGE_ID  tell the sender you read it\n  \
         /typing USER      show USER that you are typing (/typing USER stop to stop)\n  \
         /quit             leave"
    );
}

/// `HH:MM:SS` (UTC) of a unix-millisecond timestamp.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn print_frame(f: &Value, me: &str, seen: &mut HashMap<String, Seen>) {
    let s = |k: &str| f[k].as_str().unwrap_or("").to_string();
    match f["type"].as_str().unwrap_or("") {
        "CHAT_MESSAGE" => {
            let at = clock(f["timestamp"].as_i64().unwrap_or(0));
            if s("senderId") == me {
                println!(
                    "[{at}] you (other device) -> {}: {}   ({})",
                    s("receiverId"),
                    s("content"),
                    s("messageId")
                );
            } else {
                println!(
                    "[{at}] {} -> you: {}   ({})",
                    s("senderId"),
                    s("content"),
                    s("messageId")
                );
                seen.insert(
                    s("messageId"),
                    Seen {
                        chat_id: s("chatId"),
                        sender_id: s("senderId"),
                    },
                );
            }
        }
        "MESSAGE_ACK" => println!("  sent {} (route {})", s("messageId"), s("route")),
        "READ_RECEIPT" => println!("  {} read {}", s("readerId"), s("messageId")),
        "TYPING" if s("content") == "typing" => println!("  {} is typing...", s("senderId")),
        "TYPING" => println!("  {} stopped typing", s("senderId")),
        "ERROR" => println!("! {}: {}", s("code"), s("message")),
        "HEARTBEAT_ACK" => {}
        _ => println!("{f}"),
    }
}
