//! One connection of `chatd connect`, from `CONNECTED` to its end: frames in, stdin lines
//! out, heartbeats, the cursor and the unacknowledged sends kept up to date.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::cursor::Cursor;
use super::interactive::{handle_command, print_frame};
use super::{backfill, close_is_transient, lost, Chat, End};
use crate::chat::ids::now_ms;
use crate::client::{Client, ClientError, ClientWriter, Incoming};

impl Chat {
    /// One connection, from `CONNECTED` to its end.
    pub(super) async fn session(&mut self, mut client: Client) -> anyhow::Result<End> {
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
        for frame in self.unacked.take_all() {
            if let Err(e) = client.writer.send_text(&frame).await {
                return Ok(lost(e));
            }
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
                    Ok(Incoming::Frame(frame)) => {
                        for ask in self.received(&frame) {
                            if let Err(e) = client.writer.send_json(&ask).await {
                                return Ok(lost(e));
                            }
                        }
                    }
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
                            for frame in self.unacked.take_refused() {
                                if let Err(e) = client.writer.send_text(&frame).await {
                                    return Ok(lost(e));
                                }
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

    /// A frame from the server: printed, and its seq and ack recorded. Returns the frames
    /// to send in answer (history pages to ask for after `SYNC_TOO_OLD`).
    fn received(&mut self, frame: &Value) -> Vec<Value> {
        let user = &self.args.user;
        let kind = frame["type"].as_str().unwrap_or("");
        let temp = frame["tempMessageId"].as_str();
        let mut asks = Vec::new();
        let mut shown = None;
        match (kind, frame["code"].as_str(), &mut self.backfill) {
            ("ERROR", Some("SYNC_TOO_OLD"), _) => {
                let (from, to) = (frame["missedFrom"].as_u64(), frame["missedTo"].as_u64());
                if let (Some(from), Some(to)) = (from, to) {
                    self.backfill =
                        Some(backfill::Backfill::new(from, to, self.args.chat.as_deref()));
                }
            }
            ("CHAT_MESSAGE", _, Some(b)) => b.replayed(
                frame["chatId"].as_str().unwrap_or_default(),
                frame["messageId"].as_str().unwrap_or_default(),
            ),
            ("SYNCED", _, Some(b)) => asks = b.start(),
            ("HISTORY", _, Some(b)) => {
                if let Some((gap, next)) = b.page(frame) {
                    asks.extend(next);
                    shown = Some(gap);
                }
            }
            _ => {}
        }
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
            // Every frame as it came, the history pages too (a script filters by seq).
            println!("{frame}");
        } else {
            print_frame(shown.as_ref().unwrap_or(frame), user, &mut self.seen);
        }
        asks
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

    pub(super) async fn send_chat(
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
