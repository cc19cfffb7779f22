//! After `SYNC_TOO_OLD`: the inbox no longer holds seqs `missedFrom..=missedTo`, but each
//! chat's history may. The chats this device learns of during the replay (and `--chat`) are
//! paged back with `HISTORY`, once the replay is done, until a page reaches below the gap;
//! what falls inside the gap is shown. A chat whose every message lies in the gap is not
//! learnt this way: `/history CHAT` (or a `HISTORY` frame) pages through one by name.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::store::MAX_HISTORY_PAGE;

pub(super) struct Backfill {
    /// The seqs missed for good, inclusive.
    from: u64,
    to: u64,
    /// Chats to page back through: the page starts before this message (the oldest of the
    /// chat seen since the gap), or at the newest when none was seen.
    chats: BTreeMap<String, Option<String>>,
    /// The replay is done and the pages are being asked for.
    asking: bool,
}

impl Backfill {
    pub fn new(from: u64, to: u64, known_chat: Option<&str>) -> Self {
        Self {
            from,
            to,
            chats: known_chat
                .map(|c| (c.to_string(), None))
                .into_iter()
                .collect(),
            asking: false,
        }
    }

    /// A message of the replay (in seq order): its chat is one to page back through, from
    /// before the oldest of its messages seen.
    pub fn replayed(&mut self, chat_id: &str, message_id: &str) {
        if self.asking {
            return;
        }
        let start = self.chats.entry(chat_id.to_string()).or_default();
        if start.is_none() {
            *start = Some(message_id.to_string());
        }
    }

    /// The replay is done (`SYNCED`): the first page of every chat to ask for.
    pub fn start(&mut self) -> Vec<Value> {
        if self.asking {
            return Vec::new();
        }
        self.asking = true;
        self.chats
            .iter()
            .map(|(chat, before)| request(chat, before.as_deref()))
            .collect()
    }

    /// A `HISTORY` page: `None` when it is not one this backfill asked for. Otherwise the
    /// page with only the gap's messages, and the next page to ask for unless this chat is done.
    pub fn page(&mut self, frame: &Value) -> Option<(Value, Option<Value>)> {
        let chat = frame["chatId"].as_str()?;
        if !self.asking || !self.chats.contains_key(chat) {
            return None;
        }
        let messages = frame["messages"].as_array().cloned().unwrap_or_default();
        let seq = |m: &Value| m["seq"].as_u64().unwrap_or(0);
        let below = messages.iter().any(|m| seq(m) < self.from);
        let next = match messages.last() {
            Some(last) if frame["more"] == true && !below => {
                let before = last["messageId"].as_str().unwrap_or_default().to_string();
                let next = request(chat, Some(&before));
                self.chats.insert(chat.to_string(), Some(before));
                Some(next)
            }
            _ => {
                self.chats.remove(chat);
                None
            }
        };
        let gap: Vec<Value> = messages
            .into_iter()
            .filter(|m| (self.from..=self.to).contains(&seq(m)))
            .collect();
        let mut shown = frame.clone();
        shown["messages"] = Value::Array(gap);
        // The next page is asked for here, not by the person.
        shown["more"] = json!(false);
        Some((shown, next))
    }
}

fn request(chat_id: &str, before: Option<&str>) -> Value {
    let mut frame = json!({"type": "HISTORY", "chatId": chat_id, "limit": MAX_HISTORY_PAGE});
    if let Some(before) = before {
        frame["before"] = json!(before);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(chat: &str, seqs: &[u64], more: bool) -> Value {
        let messages: Vec<Value> = seqs
            .iter()
            .map(|s| json!({"messageId": format!("m{s}"), "seq": s}))
            .collect();
        json!({"type": "HISTORY", "chatId": chat, "messages": messages, "more": more})
    }

    #[test]
    fn pages_back_each_chat_until_below_the_gap_and_keeps_only_the_gap() {
        let mut b = Backfill::new(3, 6, Some("known"));
        b.replayed("x", "m7");
        b.replayed("x", "m9");
        b.replayed("known", "m8");
        assert!(b.page(&page("x", &[5], true)).is_none(), "not asked yet");
        let first = b.start();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0]["chatId"], "known");
        assert_eq!(first[0]["before"], "m8");
        assert_eq!(first[1]["before"], "m7", "before the oldest replayed");
        b.replayed("x", "m10");
        assert!(b.start().is_empty(), "asked once");

        let (shown, next) = b.page(&page("x", &[6, 5], true)).unwrap();
        assert_eq!(shown["messages"].as_array().unwrap().len(), 2);
        assert_eq!(next.unwrap()["before"], "m5");
        let (shown, next) = b.page(&page("x", &[4, 2, 1], true)).unwrap();
        assert_eq!(shown["messages"], json!([{"messageId": "m4", "seq": 4}]));
        assert!(next.is_none(), "below the gap: done");
        let (_, next) = b.page(&page("known", &[], false)).unwrap();
        assert!(next.is_none());
        assert!(
            b.page(&page("x", &[3], false)).is_none(),
            "done chats are not ours"
        );
    }
}
