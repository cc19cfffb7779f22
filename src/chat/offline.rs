//! Offline pushes: when no device of the receiver is online, one event per chat per
//! `server.offline_push_window_ms`, with the count of messages, and none if the user came
//! back before the window ended.

use super::Node;
use crate::bus::OfflinePush;

impl Node {
    /// `user_id` (the receiver, or a member of the group) has no device online: wake them
    /// through the offline-push sink. Within `server.offline_push_window_ms`, messages of one
    /// chat make one event (with their count) when the window ends, and none if the user came
    /// back meanwhile.
    pub(super) async fn offline_push(&self, user_id: &str, m: &crate::store::NewMessage) {
        let event = OfflinePush {
            user_id: user_id.to_string(),
            sender_id: m.sender_id.clone(),
            chat_id: m.chat_id.clone(),
            message_id: m.message_id.clone(),
            timestamp: m.timestamp,
            count: 1,
        };
        let window = self.config.server.offline_push_window_ms;
        if window == 0 {
            return self.emit_offline_push(event).await;
        }
        let key = (user_id.to_string(), m.chat_id.clone());
        match self.pending_pushes.entry(key.clone()) {
            dashmap::Entry::Occupied(mut open) => {
                let pending = open.get_mut();
                pending.count += 1;
                pending.message_id = event.message_id;
                pending.timestamp = event.timestamp;
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(event);
                let node = self.me.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(window)).await;
                    let Some(node) = node.upgrade() else { return };
                    let Some((_, event)) = node.pending_pushes.remove(&key) else {
                        return;
                    };
                    let back = match node.backends.presence.devices(&event.user_id).await {
                        Ok(devices) => !devices.is_empty(),
                        Err(_) => node.sessions.devices_of(&event.user_id) > 0,
                    };
                    if back {
                        node.metrics.offline_pushes_cancelled.inc();
                        tracing::debug!(user = %event.user_id, "offline push cancelled: the user came back");
                    } else {
                        node.emit_offline_push(event).await;
                    }
                });
            }
        }
    }

    async fn emit_offline_push(&self, event: OfflinePush) {
        let user = event.user_id.clone();
        match self.backends.bus.offline_push(event).await {
            Ok(()) => {
                self.metrics.offline_pushes.inc();
            }
            Err(e) => {
                self.metrics.bus_failures.inc();
                tracing::error!(user = %user, "offline push failed: {e}");
            }
        }
    }
}
