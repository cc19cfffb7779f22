//! `chatd connect` for a person: `@bob hello`, `/read ID`, `/typing bob`, `/quit`, and frames
//! printed as lines to read.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::Chat;
use crate::chat::ids::now_ms;
use crate::client::{ClientError, ClientWriter};
use crate::commands::default_chat_id;

/// What the interactive client remembers to answer `/read ID`.
pub(super) struct Seen {
    chat_id: String,
    sender_id: String,
}

/// One line a person typed. Returns true for `/quit`.
pub(super) async fn handle_command(
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
        (Some("/history"), Some(chat_id), before) => {
            let mut frame = json!({"type": "HISTORY", "chatId": chat_id});
            if let Some(before) = before {
                frame["before"] = json!(before);
            }
            writer.send_json(&frame).await?
        }
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
         /history CHAT [BEFORE_ID]  the chat's messages, newest page (older than BEFORE_ID)\n  \
         /quit             leave"
    );
}

/// `HH:MM:SS` (UTC) of a unix-millisecond timestamp.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

pub(super) fn print_frame(f: &Value, me: &str, seen: &mut HashMap<String, Seen>) {
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
        "HISTORY" => {
            let messages = f["messages"].as_array().cloned().unwrap_or_default();
            // Oldest first, as a chat reads.
            for m in messages.iter().rev() {
                let m_s = |k: &str| m[k].as_str().unwrap_or("").to_string();
                println!(
                    "[{}] (history {}) {} -> {}: {}   ({}, seq {})",
                    clock(m["timestamp"].as_i64().unwrap_or(0)),
                    s("chatId"),
                    m_s("senderId"),
                    m_s("receiverId"),
                    m_s("content"),
                    m_s("messageId"),
                    m["seq"]
                );
            }
            if f["more"] == true {
                if let Some(last) = messages.last() {
                    println!(
                        "  older messages: /history {} {}",
                        s("chatId"),
                        last["messageId"].as_str().unwrap_or("")
                    );
                }
            }
        }
        "HEARTBEAT_ACK" => {}
        _ => println!("{f}"),
    }
}

#[cfg(test)]
mod tests {
    use super::clock;

    #[test]
    fn clock_shows_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(86_399_999), "23:59:59");
        assert_eq!(clock(1_764_500_000_000), "10:53:20");
        assert_eq!(clock(-1000), "23:59:59");
    }
}
