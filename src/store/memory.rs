//! In-process store, bounded: it keeps the newest `capacity` messages. Sharded by message id
//! so that concurrent senders do not queue on one lock.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{NewMessage, SaveOutcome, Store, StoreError, StoredMessage};
use crate::chat::ids::now_ms;

const SHARDS: usize = 32;

#[derive(Default)]
struct Shard {
    messages: HashMap<String, StoredMessage>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<String>,
}

pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Per shard, so the whole store keeps about `capacity` messages.
    shard_capacity: usize,
    /// (sender, tempMessageId) -> messageId, for idempotent retries.
    idempotency: DashMap<(String, String), String>,
}

impl MemoryStore {
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            idempotency: DashMap::new(),
        }
    }

    fn shard(&self, message_id: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(message_id) as usize % SHARDS]
    }

    fn get(&self, message_id: &str) -> Option<StoredMessage> {
        lock(self.shard(message_id))
            .messages
            .get(message_id)
            .cloned()
    }
}

/// A poisoned shard only means another task panicked mid-update of plain data; keep serving.
fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Store for MemoryStore {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        // A retry of a save whose answer was lost carries the same id: store nothing twice.
        if let Some(existing) = self.get(&message.message_id) {
            return Ok(SaveOutcome::Duplicate(existing));
        }
        let key = message
            .temp_message_id
            .as_ref()
            .map(|t| (message.sender_id.clone(), t.clone()));
        if let Some(key) = &key {
            // Claim the key first: of two racing retries exactly one stores.
            match self.idempotency.entry(key.clone()) {
                dashmap::Entry::Occupied(e) => {
                    if let Some(existing) = self.get(e.get()) {
                        return Ok(SaveOutcome::Duplicate(existing));
                    }
                    // The earlier message was evicted: store this one under the key.
                    e.replace_entry(message.message_id.clone());
                }
                dashmap::Entry::Vacant(e) => {
                    e.insert(message.message_id.clone());
                }
            }
        }
        let stored = StoredMessage {
            message,
            read_at: None,
        };
        let evicted = {
            let mut shard = lock(self.shard(&stored.message.message_id));
            shard.order.push_back(stored.message.message_id.clone());
            shard
                .messages
                .insert(stored.message.message_id.clone(), stored.clone());
            let mut evicted = Vec::new();
            while shard.order.len() > self.shard_capacity {
                if let Some(old) = shard
                    .order
                    .pop_front()
                    .and_then(|id| shard.messages.remove(&id))
                {
                    evicted.push(old);
                }
            }
            evicted
        };
        for old in evicted {
            if let Some(t) = old.message.temp_message_id {
                let old_id = old.message.message_id;
                self.idempotency
                    .remove_if(&(old.message.sender_id, t), |_, id| *id == old_id);
            }
        }
        Ok(SaveOutcome::Saved(stored))
    }

    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<StoredMessage, StoreError> {
        let mut shard = lock(self.shard(message_id));
        let unknown = || StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string());
        let stored = shard.messages.get_mut(message_id).ok_or_else(unknown)?;
        if stored.message.chat_id != chat_id {
            return Err(unknown());
        }
        if stored.message.receiver_id != reader_id {
            return Err(StoreError::NotReceiver(message_id.to_string()));
        }
        stored.read_at.get_or_insert_with(now_ms);
        Ok(stored.clone())
    }

    async fn health(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, temp: Option<&str>) -> NewMessage {
        NewMessage {
            message_id: id.into(),
            sender_id: "a".into(),
            receiver_id: "b".into(),
            chat_id: "c".into(),
            content: "hi".into(),
            timestamp: 1,
            temp_message_id: temp.map(String::from),
        }
    }

    #[tokio::test]
    async fn save_is_idempotent_on_sender_and_temp_id() {
        let s = MemoryStore::new(100);
        assert!(matches!(
            s.save(msg("m1", Some("t"))).await.unwrap(),
            SaveOutcome::Saved(_)
        ));
        match s.save(msg("m2", Some("t"))).await.unwrap() {
            SaveOutcome::Duplicate(m) => assert_eq!(m.message.message_id, "m1"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.save(msg("m3", None)).await.unwrap(),
            SaveOutcome::Saved(_)
        ));
        assert!(matches!(
            s.save(msg("m4", None)).await.unwrap(),
            SaveOutcome::Saved(_)
        ));
    }

    #[tokio::test]
    async fn mark_read_checks_chat_and_reader() {
        let s = MemoryStore::new(100);
        s.save(msg("m1", None)).await.unwrap();
        assert!(matches!(
            s.mark_read("b", "other", "m1").await,
            Err(StoreError::UnknownMessage(..))
        ));
        assert!(matches!(
            s.mark_read("a", "c", "m1").await,
            Err(StoreError::NotReceiver(_))
        ));
        assert!(matches!(
            s.mark_read("b", "c", "nope").await,
            Err(StoreError::UnknownMessage(..))
        ));
        let read = s.mark_read("b", "c", "m1").await.unwrap();
        assert!(read.read_at.is_some());
        assert_eq!(read.message.sender_id, "a");
    }

    #[tokio::test]
    async fn keeps_about_capacity_messages() {
        let s = MemoryStore::new(64);
        for i in 0..10_000 {
            s.save(msg(&format!("m{i}"), Some(&format!("t{i}"))))
                .await
                .unwrap();
        }
        let kept: usize = s.shards.iter().map(|sh| lock(sh).messages.len()).sum();
        assert!(kept <= 64 + SHARDS, "{kept}");
        assert!(
            s.idempotency.len() <= 64 + SHARDS,
            "{}",
            s.idempotency.len()
        );
        assert!(s.get("m9999").is_some());
    }
}
