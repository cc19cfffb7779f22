//! `chatd connect`: a terminal chat client. On a terminal a person types `@bob hello`,
//! `/read ID`, `/typing bob`, `/quit`; with `--json` (or stdin not a terminal) every stdin line
//! is sent as a raw frame and every received frame is printed as one JSON line. Heartbeats
//! are sent by the client itself.
//!
//! It loses nothing across disconnects: the last `seq` it saw is kept per user in a small
//! state file and given as `?since=` on every connect, so the node replays what was missed;
//! when a node goes away it reconnects by itself (to the next `--url`, with backoff and
//! jitter); and sends not yet acknowledged are sent again, with the same `tempMessageId`, so
//! the store keeps each once. When the inbox no longer holds what it missed (`SYNC_TOO_OLD`),
//! it pages back through the history of the chats it learns of for those messages.

mod backfill;
mod cursor;
mod interactive;
mod session;
mod unacked;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::DEFAULT_URL;
use crate::backoff::Backoff;
use crate::client::{chat_url_with_token, with_since, Client, ClientError};
use cursor::Cursor;
use unacked::Unacked;

/// 100 ms doubling up to 5 s, with jitter, so that the clients of a node that died do not
/// all come back at the same instant.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

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
    seen: HashMap<String, interactive::Seen>,
    temp_seq: u64,
    lines: mpsc::Receiver<String>,
    stdin_open: bool,
    /// After stdin ends: when to give up waiting for acks.
    ack_deadline: Option<Instant>,
    /// After stdin ended and every send was acknowledged: when to close.
    linger_until: Option<Instant>,
    /// After `SYNC_TOO_OLD`: the chats being paged back for what the inbox lost.
    backfill: Option<backfill::Backfill>,
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
        backfill: None,
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
                let pause = RECONNECT.delay(attempt);
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

fn lost(e: ClientError) -> End {
    End::Lost {
        why: format!("connection lost: {e}"),
        retry: reconnectable(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_pass_are_reconnected() {
        let refused = |status| ClientError::Refused {
            url: "ws://node".into(),
            status,
            body: String::new(),
        };
        assert!(reconnectable(&refused(503)) && reconnectable(&refused(429)));
        assert!(!reconnectable(&refused(401)) && !reconnectable(&refused(400)));
        for code in [1001, 1006, 1012, 1013] {
            assert!(close_is_transient(code), "{code}");
        }
        for code in [1000, 1002, 1008, 1009, 4001] {
            assert!(!close_is_transient(code), "{code}");
        }
    }
}
