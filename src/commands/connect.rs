//! `chatd connect`: a terminal chat client. On a terminal a person types `@bob hello`,
//! `/read ID`, `/typing bob`, `/quit`; with `--json` (or stdin not a terminal) every stdin line
//! is sent as a raw frame and every received frame is printed as one JSON line. Heartbeats
//! are sent by the client itself.
//!
//! It loses nothing across disconnects: the last `seq` it saw is kept per user in a small
//! state file and given as `?since=` on every connect, so the node replays what was missed;
//! when a node goes away it reconnects by itself (to the next `--url`, with backoff and
//! jitter); and sends not yet acknowledged are sent again, with the same `tempMessageId`, so
//! the store keeps each once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{default_chat_id, DEFAULT_URL};
use crate::chat::ids::now_ms;
use crate::client::{chat_url_with_token, with_since, Client, ClientError, ClientWriter, Incoming};

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Your user id
    #[arg(long)]
    pub user: String,
    /// The node to connect to; give several to fail over: each reconnect tries the next
    #[arg(long = "url", default_value = DEFAULT_URL, value_name = "URL")]
    pub urls: Vec<String>,
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
    /// After stdin ends and every send is acknowledged, keep printing received frames this
    /// many seconds before closing
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub linger: f64,
    /// Where the last seq seen is kept, one file per user (`{user}.cursor`) [default:
    /// $XDG_STATE_HOME/chatd or ~/.local/state/chatd]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Replay the inbox after this seq on connecting, instead of after the saved cursor (0:
    /// the whole inbox)
    #[arg(long, value_name = "SEQ")]
    pub since: Option<u64>,
    /// Exit when the connection ends instead of reconnecting
    #[arg(long)]
    pub no_reconnect: bool,
    /// After stdin ends, give up on sends still not acknowledged after this many seconds
    /// (exit status 1)
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub ack_timeout: f64,
}

/// What the interactive client remembers to answer `/read ID`.
struct Seen {
    chat_id: String,
    sender_id: String,
}

/// The user's state file: the last seq seen. Written atomically (a temp file of this
/// process, then rename) at most every [`Cursor::EVERY`], and at every disconnect and exit.
/// One file per user, so clients of different users on one machine never write the same
/// file.
struct Cursor {
    user: String,
    path: Option<PathBuf>,
    seq: Option<u64>,
    dirty: bool,
    last_write: Instant,
}

impl Cursor {
    const EVERY: Duration = Duration::from_millis(250);

    fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
        Some(base.join("chatd"))
    }

    /// Reads `{dir}/{user}.cursor` (user ids hold no `/`); none yet is no cursor.
    fn open(dir: Option<PathBuf>, user: &str) -> anyhow::Result<Cursor> {
        let path = dir
            .or_else(Self::default_dir)
            .map(|d| d.join(format!("{user}.cursor")));
        let seq = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    Some(v["seq"].as_u64().with_context(|| {
                        format!(
                            "state file {} is not {{\"userId\": ..., \"seq\": N}}; fix or delete it",
                            p.display()
                        )
                    })?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
            },
            None => None,
        };
        Ok(Cursor {
            user: user.to_string(),
            path,
            seq,
            dirty: false,
            last_write: Instant::now(),
        })
    }

    fn get(&self) -> Option<u64> {
        self.seq
    }

    /// Records `seq` as seen (the highest wins).
    fn saw(&mut self, seq: u64) {
        if self.seq.is_none_or(|c| seq > c) {
            self.seq = Some(seq);
            self.dirty = true;
        }
    }

    /// Sets the cursor, also backwards.
    fn set(&mut self, seq: u64) {
        if self.seq.replace(seq) != Some(seq) {
            self.dirty = true;
        }
    }

    async fn save_soon(&mut self) {
        if self.dirty && self.last_write.elapsed() >= Self::EVERY {
            self.save().await;
        }
    }

    /// Writes the cursor to a temporary file and renames it over the state file, so a crash
    /// leaves the old cursor or the new one. Through tokio::fs: the session loop is not held.
    async fn save(&mut self) {
        let (Some(path), Some(seq)) = (&self.path, self.seq) else {
            return;
        };
        if !self.dirty {
            return;
        }
        let text = json!({"userId": self.user, "seq": seq}).to_string();
        let write = async {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, path).await
        };
        match write.await {
            Ok(()) => self.dirty = false,
            Err(e) => eprintln!("cannot write the state file {}: {e}", path.display()),
        }
        self.last_write = Instant::now();
    }
}

/// Sends not acknowledged yet, by `tempMessageId`, in the order they were sent.
#[derive(Default)]
struct Unacked {
    frames: BTreeMap<u64, (String, String)>,
    by_temp: HashMap<String, u64>,
    next: u64,
    /// Refused for now (store down, rate limit): sent again at `retry_at`.
    refused: BTreeSet<u64>,
    retry_at: Option<Instant>,
}

impl Unacked {
    fn add(&mut self, temp: String, frame: String) {
        self.next += 1;
        if let Some(old) = self.by_temp.insert(temp.clone(), self.next) {
            self.frames.remove(&old);
        }
        self.frames.insert(self.next, (temp, frame));
    }

    fn done(&mut self, temp: &str) {
        if let Some(n) = self.by_temp.remove(temp) {
            self.frames.remove(&n);
            self.refused.remove(&n);
        }
    }

    /// The node refused this send for now: send it again in a moment.
    fn refused(&mut self, temp: &str, retry_in: Duration) {
        if let Some(n) = self.by_temp.get(temp) {
            self.refused.insert(*n);
            self.retry_at
                .get_or_insert_with(|| Instant::now() + retry_in);
        }
    }

    /// Sends again what was refused, in the order first sent.
    async fn resend_refused(&mut self, writer: &mut ClientWriter) -> Result<(), ClientError> {
        self.retry_at = None;
        for n in std::mem::take(&mut self.refused) {
            if let Some((_, frame)) = self.frames.get(&n) {
                writer.send_text(frame).await?;
            }
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn len(&self) -> usize {
        self.frames.len()
    }

    /// After a reconnect: everything not acknowledged, in the order first sent.
    async fn resend_all(&mut self, writer: &mut ClientWriter) -> Result<(), ClientError> {
        self.retry_at = None;
        self.refused.clear();
        for (_, frame) in self.frames.values() {
            writer.send_text(frame).await?;
        }
        Ok(())
    }
}

/// Why a connection ended.
enum End {
    /// Done: `/quit`, or stdin ended, every send acknowledged, and the linger passed.
    Quit,
    /// Lost: reconnect if allowed and it makes sense.
    Lost { why: String, retry: bool },
}

/// One connected client's bookkeeping that outlives a connection.
struct Chat {
    args: ConnectArgs,
    json_mode: bool,
    state: Cursor,
    unacked: Unacked,
    seen: HashMap<String, Seen>,
    temp_seq: u64,
    lines: mpsc::Receiver<String>,
    stdin_open: bool,
    /// After stdin ends: when to give up waiting for acks.
    ack_deadline: Option<Instant>,
    /// After stdin ended and every send was acknowledged: when to close.
    linger_until: Option<Instant>,
}

pub async fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let json_mode = args.json || (!args.interactive && !std::io::stdin().is_terminal());
    let mut state = Cursor::open(args.state_dir.clone(), &args.user)?;
    if let Some(since) = args.since {
        state.set(since);
    }
    let (lines_tx, lines) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });
    let mut chat = Chat {
        json_mode,
        state,
        unacked: Unacked::default(),
        seen: HashMap::new(),
        temp_seq: 0,
        lines,
        stdin_open: true,
        ack_deadline: None,
        linger_until: None,
        args,
    };
    let wait = Duration::from_secs(10);
    let mut attempt = 0u32;
    let mut url_index = 0usize;
    loop {
        let url = &chat.args.urls[url_index % chat.args.urls.len()];
        let base = chat_url_with_token(url, &chat.args.user, chat.args.token.as_deref());
        let full = match chat.state.get() {
            Some(since) => with_since(&base, since),
            None => base,
        };
        let end = match Client::connect_url(&full, wait).await {
            Ok(client) => {
                attempt = 0;
                chat.session(client).await?
            }
            Err(e) => {
                let retry = reconnectable(&e);
                End::Lost {
                    why: format!("connect to {url} failed: {e}"),
                    retry,
                }
            }
        };
        chat.state.save().await;
        match end {
            End::Quit => break,
            End::Lost { why, retry } => {
                if chat.args.no_reconnect || !retry {
                    anyhow::bail!("{why}");
                }
                if chat.linger_until.is_some_and(|t| Instant::now() >= t) {
                    // Done sending and lingering: nothing left to reconnect for.
                    eprintln!("{why}");
                    break;
                }
                if chat.ack_deadline.is_some_and(|d| Instant::now() >= d) {
                    anyhow::bail!(
                        "{why}; {} sends were never acknowledged (see --ack-timeout)",
                        chat.unacked.len()
                    );
                }
                let pause = backoff(attempt);
                attempt += 1;
                url_index += 1;
                eprintln!(
                    "{why}; reconnecting to {} in {} ms",
                    chat.args.urls[url_index % chat.args.urls.len()],
                    pause.as_millis()
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
    chat.state.save().await;
    Ok(())
}

/// Whether to try again after a failed connect: not after a refusal that will repeat (bad
/// token, bad user id), yes after one that passes (node full or shutting down) and after
/// network errors.
fn reconnectable(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { status, .. } => matches!(status, 429 | 502 | 503 | 504),
        ClientError::Closed { code, .. } => close_is_transient(*code),
        _ => true,
    }
}

/// Close codes after which a reconnect makes sense: the node went away or restarts, or it
/// closed a connection that fell behind (it will catch up with `?since=`).
fn close_is_transient(code: u16) -> bool {
    matches!(code, 1001 | 1005 | 1006 | 1011 | 1012 | 1013 | 1014)
}

/// 100 ms doubling up to 5 s, with jitter: a random time between half and all of it, so that
/// the clients of a node that died do not all come back at the same instant.
fn backoff(attempt: u32) -> Duration {
    let full = 100u64.saturating_mul(1 << attempt.min(6)).min(5000);
    let random = std::hash::RandomState::new().hash_one(now_ms());
    Duration::from_millis(full / 2 + random % (full / 2 + 1))
}

impl Chat {
    /// One connection, from `CONNECTED` to its end.
    async fn session(&mut self, mut client: Client) -> anyhow::Result<End> {
        let user = self.args.user.clone();
        if self.json_mode {
            println!("{}", client.welcome);
        } else {
            println!(
                "connected to node {} as {} (connection {}). Type /help for commands.",
                client.welcome["nodeId"].as_str().unwrap_or("?"),
                user,
                client.connection_id()
            );
        }
        client.pace_to_node_limit();
        if let Err(e) = self.unacked.resend_all(&mut client.writer).await {
            return Ok(lost(e));
        }
        let mut heartbeat = tokio::time::interval(client.heartbeat_interval());
        heartbeat.tick().await;
        let mut flush = tokio::time::interval(Cursor::EVERY);
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        loop {
            if !self.stdin_open && self.unacked.is_empty() && self.linger_until.is_none() {
                self.linger_until =
                    Some(Instant::now() + Duration::from_secs_f64(self.args.linger.max(0.0)));
            }
            if self.linger_until.is_some_and(|t| Instant::now() >= t) {
                client.close().await;
                return Ok(End::Quit);
            }
            if self.ack_deadline.is_some_and(|d| Instant::now() >= d) && !self.unacked.is_empty() {
                client.close().await;
                anyhow::bail!(
                    "{} sends were not acknowledged within --ack-timeout",
                    self.unacked.len()
                );
            }
            let wake = [self.linger_until, self.ack_deadline, self.unacked.retry_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(far);
            tokio::select! {
                incoming = client.reader.next(wake.saturating_duration_since(Instant::now())) => match incoming {
                    Ok(Incoming::Frame(frame)) => self.received(&frame),
                    Ok(Incoming::Closed { code: 1000, reason }) => {
                        eprintln!("connection closed by the server: 1000 {reason}");
                        return Ok(End::Quit);
                    }
                    Ok(Incoming::Closed { code, reason }) => {
                        return Ok(End::Lost {
                            why: format!("connection closed by the server: {code} {reason}"),
                            retry: close_is_transient(code),
                        });
                    }
                    Err(ClientError::Timeout(_)) => {
                        if self.unacked.retry_at.is_some_and(|t| Instant::now() >= t) {
                            if let Err(e) = self.unacked.resend_refused(&mut client.writer).await {
                                return Ok(lost(e));
                            }
                        }
                    }
                    Err(e) => return Ok(lost(e)),
                },
                // While the node refuses sends for now, new lines wait (no more refusals).
                line = self.lines.recv(), if self.stdin_open && self.unacked.retry_at.is_none() => match line {
                    Some(line) => {
                        match self.handle_line(&mut client.writer, &line).await {
                            Ok(true) => {
                                client.close().await;
                                return Ok(End::Quit);
                            }
                            Ok(false) => {}
                            Err(e) => return Ok(lost(e)),
                        }
                    }
                    None => {
                        self.stdin_open = false;
                        self.ack_deadline =
                            Some(Instant::now() + Duration::from_secs_f64(self.args.ack_timeout.max(0.0)));
                    }
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = client.writer.send_json(&json!({"type": "HEARTBEAT", "content": "ping"})).await {
                        return Ok(lost(e));
                    }
                }
                _ = flush.tick() => self.state.save_soon().await,
            }
        }
    }

    /// A frame from the server: printed, and its seq and ack recorded.
    fn received(&mut self, frame: &Value) {
        let user = &self.args.user;
        let kind = frame["type"].as_str().unwrap_or("");
        let temp = frame["tempMessageId"].as_str();
        match kind {
            "MESSAGE_ACK" => {
                if let Some(t) = temp {
                    self.unacked.done(t);
                }
            }
            // The copy of our own message, replayed after a reconnect: it is stored.
            "CHAT_MESSAGE" if frame["senderId"].as_str() == Some(user.as_str()) => {
                if let Some(t) = temp {
                    self.unacked.done(t);
                }
            }
            "ERROR" => match (frame["code"].as_str(), temp) {
                (Some("STORE_UNAVAILABLE" | "RATE_LIMITED"), Some(t)) => {
                    self.unacked.refused(t, Duration::from_millis(500));
                }
                // Refused for good (content, size...): resending would not help.
                (_, Some(t)) => self.unacked.done(t),
                _ => {}
            },
            _ => {}
        }
        match (kind, frame["seq"].as_u64()) {
            // Everything up to seq was sent: authoritative, also when it is lower than our
            // cursor (the server's store was reset: CURSOR_AHEAD came before it).
            ("SYNCED", Some(seq)) => self.state.set(seq),
            (_, Some(seq)) => self.state.saw(seq),
            _ => {}
        }
        if self.json_mode {
            println!("{frame}");
        } else {
            print_frame(frame, user, &mut self.seen);
        }
    }

    /// One stdin line. Returns true for `/quit`.
    async fn handle_line(
        &mut self,
        writer: &mut ClientWriter,
        line: &str,
    ) -> Result<bool, ClientError> {
        if !self.json_mode {
            return handle_command(self, writer, line).await;
        }
        let line = line.trim();
        if line.is_empty() {
            return Ok(false);
        }
        // A chat message gets a tempMessageId if it has none, and is kept until acknowledged.
        if let Ok(mut frame) = serde_json::from_str::<Value>(line) {
            if frame["type"] == "CHAT_MESSAGE" {
                self.send_chat(writer, &mut frame).await?;
                return Ok(false);
            }
        }
        writer.send_text(line).await?;
        Ok(false)
    }

    async fn send_chat(
        &mut self,
        writer: &mut ClientWriter,
        frame: &mut Value,
    ) -> Result<(), ClientError> {
        if !frame["tempMessageId"].is_string() {
            self.temp_seq += 1;
            frame["tempMessageId"] = json!(format!("cli-{}-{}", now_ms(), self.temp_seq));
        }
        let temp = frame["tempMessageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let text = frame.to_string();
        self.unacked.add(temp, text.clone());
        writer.send_text(&text).await
    }
}

fn lost(e: ClientError) -> End {
    End::Lost {
        why: format!("connection lost: {e}"),
        retry: reconnectable(&e),
    }
}

/// One line a person typed. Returns true for `/quit`.
async fn handle_command(
    chat: &mut Chat,
    writer: &mut ClientWriter,
    line: &str,
) -> Result<bool, ClientError> {
    let args = &chat.args;
    let line = line.trim();
    if line.is_empty() {
        return Ok(false);
    }
    if let Some(rest) = line.strip_prefix('@') {
        let Some((to, text)) = rest.split_once(char::is_whitespace) else {
            eprintln!("usage: @user message");
            return Ok(false);
        };
        let chat_id = args
            .chat
            .clone()
            .unwrap_or_else(|| default_chat_id(&args.user, to));
        let mut frame = json!({
            "type": "CHAT_MESSAGE",
            "receiverId": to,
            "chatId": chat_id,
            "content": text.trim(),
            "timestamp": now_ms(),
        });
        chat.send_chat(writer, &mut frame).await?;
        return Ok(false);
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("/quit"), ..) => return Ok(true),
        (Some("/help"), ..) => print_help(),
        (Some("/read"), Some(id), _) => match chat.seen.get(id) {
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
            let chat_id = args
                .chat
                .clone()
                .unwrap_or_else(|| default_chat_id(&args.user, to));
            let content = if stop == Some("stop") {
                "stop_typing"
            } else {
                "typing"
            };
            writer
                .send_json(&json!({"type": "TYPING", "receiverId": to, "chatId": chat_id, "content": content}))
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
        "SYNCED" => {
            let n = f["replayed"].as_u64().unwrap_or(0);
            if n > 0 {
                println!(
                    "  caught up: {n} missed while away (up to seq {})",
                    f["seq"]
                );
            }
        }
        "HEARTBEAT_ACK" => {}
        _ => println!("{f}"),
    }
}
