//! A chat's history, paged back from the store: the `HISTORY` frame and `GET
//! /api/chat/history/{chatId}` share [`Node::history`]. Only a user with messages in the chat
//! (its sender or receiver) reads it: the store answers from that user's own history.

use super::Node;
use crate::chat::registry::SessionHandle;
use crate::protocol::{FrameError, HistoryItem, ServerFrame};
use crate::store::ChatPage;

/// A page as the `HISTORY` frame (and the REST body) carries it.
pub fn history_frame(chat_id: &str, page: &ChatPage) -> String {
    let messages = page
        .messages
        .iter()
        .map(|h| {
            let m = &h.message.message;
            HistoryItem {
                message_id: &m.message_id,
                sender_id: &m.sender_id,
                receiver_id: &m.receiver_id,
                content: &m.content,
                timestamp: m.timestamp,
                seq: h.seq,
                read_at: h.message.read_at,
            }
        })
        .collect();
    ServerFrame::History {
        chat_id,
        messages,
        more: page.more,
    }
    .encode()
}

impl Node {
    /// `user_id`'s page of chat `chat_id`, encoded; the refusal when the store gives none.
    pub async fn history(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<String, FrameError> {
        let page = self
            .backends
            .store
            .fetch_chat(user_id, chat_id, before, limit)
            .await
            .map_err(|e| self.store_refusal(&e))?;
        Ok(history_frame(chat_id, &page))
    }

    /// `HISTORY`: the page to the asking device only.
    pub async fn handle_history(
        &self,
        from: &SessionHandle,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) {
        match self.history(&from.user_id, chat_id, before, limit).await {
            Ok(frame) => {
                from.reply(frame.into(), super::REPLY_PATIENCE, &self.metrics)
                    .await
            }
            Err(e) => self.reply_error(from, &e).await,
        }
    }
}
