//! In-process store, bounded: it keeps the newest `capacity` messages. Sharded by message id
//! so that concurrent senders do not queue on one lock; each user's inbox is its own entry in
//! a concurrent map and points at the messages it holds. An inbox left empty by eviction is
//! dropped, so the map holds at most about twice `capacity` users however many ids clients
//! make up; its latest seq is kept in one of [`FLOORS`] buckets (by hash of the user), where
//! the user's next inbox starts, so a user's seqs never go back.
//!
//! Its maps hash with foldhash (randomly seeded per map, as hashbrown's own default), not
//! SipHash: keys are ids clients choose, and foldhash's seed is what keeps them from
//! aiming at one bucket; SipHash was 3 % of a node's CPU here.
//!
//! Lock order, everywhere: a shard, then a slot, then an inbox. Nothing takes an earlier one
//! while holding a later one (a retry racing the eviction of its own message once deadlocked
//! two workers that way). A save locks its own new slot before anything else: nobody can
//! reach that slot until the save makes it known (by its claim, or in its shard).
//!
//! A sender's `tempMessageId`s are claimed in the sender's own inbox entry (see
//! [`Inbox::claims`]), not in a map of their own: the save looks that entry up anyway, and an
//! eviction visits it anyway, so idempotency costs no map and no lock of its own (a map of
//! (sender, tempMessageId) was a tenth of a node's CPU with the store full).

use std::collections::hash_map::Entry as MapEntry;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use dashmap::DashMap;
use foldhash::fast::RandomState;
use foldhash::HashMap;

use super::{
    group_roster, ChatPage, EntryKind, HistoryMessage, InboxEntry, InboxPage, Member, MemberChange,
    NewMessage, Receipt, SaveOutcome, Store, StoreError, StoredMessage, MAX_HISTORY_PAGE, MAX_PAGE,
};
use crate::chat::ids::now_ms;

const SHARDS: usize = 32;
/// Buckets of the latest seq of dropped inboxes (128 KiB). A user new to the store whose
/// bucket holds a dropped user's seq starts above it: a device replaying from 0 is then told
/// `SYNC_TOO_OLD` for seqs it never had. More buckets make that rarer.
const FLOORS: usize = 16 * 1024;

/// One stored message, shared by the id index and the inboxes that hold it.
struct Slot {
    state: Mutex<SlotState>,
    /// Dropped from the id index (over capacity): inboxes drop it from their front too.
    evicted: AtomicBool,
}

struct SlotState {
    stored: StoredMessage,
    /// The read receipt's place in the sender's inbox, once read.
    receipt_seq: u64,
    /// A group message: each member that read it, when, and its receipt's place in the
    /// sender's inbox (`stored.read_at` stays unset: each member has its own).
    reads: Vec<(String, i64, u64)>,
}

impl SlotState {
    /// The message as `user_id` sees it: its own place as `receiver_seq` in a group, and its
    /// own read time.
    fn view(&self, user_id: &str) -> StoredMessage {
        // Without the members' places (a read gives each user its own, as the Redis store
        // does): a large group's list is not copied for every entry of every catch-up.
        let s = &self.stored;
        let mut m = StoredMessage {
            message: s.message.clone(),
            read_at: s.read_at,
            receiver_seq: s.receiver_seq,
            sender_seq: s.sender_seq,
            member_seqs: Vec::new(),
        };
        if m.message.group && m.message.sender_id != user_id {
            if let Some((_, seq)) = s.member_seqs.iter().find(|(u, _)| u == user_id) {
                m.receiver_seq = *seq;
            }
            m.read_at = self
                .reads
                .iter()
                .find(|(u, ..)| u == user_id)
                .map(|(_, at, _)| *at);
        }
        m
    }

    /// Everyone whose inbox holds the message.
    fn users(&self) -> Vec<String> {
        let m = &self.stored.message;
        let mut users = vec![m.sender_id.clone()];
        if m.group {
            users.extend(self.stored.member_seqs.iter().map(|(u, _)| u.clone()));
        } else {
            users.push(m.receiver_id.clone());
        }
        users
    }
}

/// One place of an inbox: what it holds, and for a group's receipt, the member who read.
type Entry = (EntryKind, Arc<Slot>, Option<Arc<str>>);

#[derive(Default)]
struct Shard {
    /// By message id; the id is one allocation shared with `order`.
    messages: HashMap<Arc<str>, Arc<Slot>>,
    /// Insertion order, oldest first, for eviction.
    order: VecDeque<Arc<str>>,
}

/// One user's inbox: seqs `latest - entries.len() + 1 ..= latest`, contiguous.
#[derive(Default)]
struct Inbox {
    latest: u64,
    entries: VecDeque<Entry>,
    /// The user's sends by `tempMessageId`, for idempotent retries: the message stored under
    /// each (or being stored: its slot is locked until it has its places). An entry goes when
    /// its message is evicted; an inbox that holds any is not dropped.
    claims: HashMap<String, Arc<Slot>>,
}

impl Inbox {
    /// Drops the claim of `temp` if `slot` holds it (not a later send that took it over).
    fn let_go(&mut self, temp: &str, slot: &Arc<Slot>) {
        if self.claims.get(temp).is_some_and(|c| Arc::ptr_eq(c, slot)) {
            self.claims.remove(temp);
        }
    }

    fn oldest(&self) -> u64 {
        self.latest + 1 - self.entries.len() as u64
    }

    /// Drops entries from the front while there are more than `max` or the front one's
    /// message was evicted (the store no longer keeps it).
    fn trim(&mut self, max: usize) {
        while self.entries.len() > max
            || self
                .entries
                .front()
                .is_some_and(|(_, s, _)| s.evicted.load(Ordering::Relaxed))
        {
            self.entries.pop_front();
        }
    }
}

pub struct MemoryStore {
    shards: Vec<Mutex<Shard>>,
    hasher: RandomState,
    /// Per shard, so the whole store keeps about `capacity` messages.
    shard_capacity: usize,
    inboxes: DashMap<String, Inbox, RandomState>,
    inbox_max_entries: usize,
    /// Per bucket of users, the highest latest seq of an inbox that was dropped: an inbox
    /// made again starts there, so a device's cursor is never ahead of its user's seqs.
    floors: Vec<AtomicU64>,
    /// Groups and their members, creator first; kept whatever the message capacity.
    groups: Mutex<HashMap<String, Vec<Member>>>,
    group_max_members: usize,
}

impl MemoryStore {
    pub fn new(capacity: usize, inbox_max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::default(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            inboxes: DashMap::default(),
            inbox_max_entries: inbox_max_entries.max(1),
            floors: (0..FLOORS).map(|_| AtomicU64::new(0)).collect(),
            groups: Mutex::new(HashMap::default()),
            group_max_members: super::DEFAULT_GROUP_MAX_MEMBERS,
        }
    }

    /// At most `max` members per group (`store.group_max_members`).
    pub fn with_group_max_members(self, max: usize) -> Self {
        Self {
            group_max_members: max,
            ..self
        }
    }

    /// Who receives a message to group `group_id` from `sender`: every member but it.
    fn recipients(&self, group_id: &str, sender: &str) -> Result<Vec<String>, StoreError> {
        let groups = lock(&self.groups);
        let members = groups
            .get(group_id)
            .ok_or_else(|| StoreError::NoSuchGroup(group_id.to_string()))?;
        super::group_receivers(group_id, sender, members)
    }

    fn shard(&self, message_id: &str) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(message_id) as usize % SHARDS]
    }

    fn slot(&self, message_id: &str) -> Option<Arc<Slot>> {
        lock(self.shard(message_id))
            .messages
            .get(message_id)
            .cloned()
    }

    #[cfg(test)]
    fn get(&self, message_id: &str) -> Option<StoredMessage> {
        self.slot(message_id).map(|s| lock(&s.state).stored.clone())
    }

    /// Gives `slot` the next place in `user_id`'s inbox.
    fn append(&self, user_id: &str, kind: EntryKind, slot: &Arc<Slot>) -> u64 {
        self.append_entry(user_id, (kind, slot.clone(), None))
    }

    fn floor(&self, user_id: &str) -> &AtomicU64 {
        &self.floors[self.hasher.hash_one(user_id) as usize % FLOORS]
    }

    /// Runs `f` on `user_id`'s inbox, made (starting at the user's floor) if it has none.
    fn with_inbox<T>(&self, user_id: &str, f: impl FnOnce(&mut Inbox) -> T) -> T {
        let mut inbox = match self.inboxes.get_mut(user_id) {
            Some(inbox) => inbox,
            None => self
                .inboxes
                .entry(user_id.to_string())
                .or_insert_with(|| Inbox {
                    latest: self.floor(user_id).load(Ordering::Relaxed),
                    ..Inbox::default()
                }),
        };
        f(&mut inbox)
    }

    /// Gives `entry` the next place in `user_id`'s inbox.
    fn append_entry(&self, user_id: &str, entry: Entry) -> u64 {
        self.with_inbox(user_id, |inbox| {
            inbox.latest += 1;
            inbox.entries.push_back(entry);
            inbox.trim(self.inbox_max_entries);
            inbox.latest
        })
    }

    /// Claims `sender`'s `temp` for `slot`, or answers the slot of the message that holds it.
    /// A claim whose message was evicted is taken over: that send is stored again.
    fn claim(&self, sender: &str, temp: &str, slot: &Arc<Slot>) -> Option<Arc<Slot>> {
        // One lookup, by the key a new claim needs anyway (a retry, which finds one, is rare).
        self.with_inbox(sender, |inbox| match inbox.claims.entry(temp.to_string()) {
            MapEntry::Occupied(e) if !e.get().evicted.load(Ordering::Relaxed) => {
                Some(e.get().clone())
            }
            MapEntry::Occupied(mut e) => {
                e.insert(slot.clone());
                None
            }
            MapEntry::Vacant(e) => {
                e.insert(slot.clone());
                None
            }
        })
    }
}

/// A poisoned lock only means another task panicked mid-update of plain data; keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Store for MemoryStore {
    async fn save(&self, message: NewMessage) -> Result<SaveOutcome, StoreError> {
        // Membership is checked before anything is claimed: a refused send leaves nothing.
        let recipients = if message.group {
            self.recipients(&message.receiver_id, &message.sender_id)?
        } else {
            Vec::new()
        };
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                stored: StoredMessage::unsequenced(message),
                receipt_seq: 0,
                reads: Vec::new(),
            }),
            evicted: AtomicBool::new(false),
        });
        // Locked until it has its places, so nobody reads it without them.
        let mut state = lock(&slot.state);
        let m = &state.stored.message;
        // Claimed first: of two racing retries exactly one stores; the other waits for the
        // first one's places (its slot's lock) and answers them.
        let held = (m.temp_message_id.as_deref()).and_then(|t| self.claim(&m.sender_id, t, &slot));
        if let Some(held) = held {
            drop(state);
            return Ok(SaveOutcome::Duplicate(lock(&held.state).stored.clone()));
        }
        let id: Arc<str> = state.stored.message.message_id.as_str().into();
        let evicted = {
            let mut guard = lock(self.shard(&id));
            let shard = &mut *guard;
            // A retry of a save whose answer was lost carries the same id: store nothing
            // twice. Looked for by the insert itself, under its lock (a separate lookup
            // first was 3 % of a node's CPU, and a lookup before the insert 1.7 %); with a
            // tempMessageId the claim above already found it.
            let existing = match shard.messages.entry(id) {
                MapEntry::Occupied(e) => Some(e.get().clone()),
                MapEntry::Vacant(e) => {
                    shard.order.push_back(e.key().clone());
                    e.insert(slot.clone());
                    None
                }
            };
            if let Some(existing) = existing {
                drop(guard);
                // (Had this one claimed a tempMessageId the stored one did not, the claim
                // would point at a slot that is never stored nor evicted: let it go.)
                if let Some(t) = state.stored.message.temp_message_id.as_deref() {
                    let sender = &state.stored.message.sender_id;
                    if let Some(mut inbox) = self.inboxes.get_mut(sender) {
                        inbox.let_go(t, &slot);
                    }
                }
                drop(state);
                return Ok(SaveOutcome::Duplicate(lock(&existing.state).stored.clone()));
            }
            let mut evicted = Vec::new();
            while shard.order.len() > self.shard_capacity {
                if let Some(old) = shard
                    .order
                    .pop_front()
                    .and_then(|id| shard.messages.remove(&id))
                {
                    old.evicted.store(true, Ordering::Relaxed);
                    evicted.push(old);
                }
            }
            evicted
        };
        let m = &state.stored.message;
        if m.group {
            // Each member's place, then the sender's (as in the Redis store: a message in
            // the sender's inbox is one its members have).
            let member_seqs: Vec<(String, u64)> = recipients
                .into_iter()
                .map(|u| {
                    let seq = self.append(&u, EntryKind::Message, &slot);
                    (u, seq)
                })
                .collect();
            state.stored.sender_seq = self.append(&m.sender_id, EntryKind::Message, &slot);
            state.stored.member_seqs = member_seqs;
        } else {
            let receiver_seq = self.append(&m.receiver_id, EntryKind::Message, &slot);
            let sender_seq = if m.sender_id == m.receiver_id {
                receiver_seq
            } else {
                self.append(&m.sender_id, EntryKind::Message, &slot)
            };
            state.stored.receiver_seq = receiver_seq;
            state.stored.sender_seq = sender_seq;
        }
        let stored = state.stored.clone();
        drop(state);
        for old in evicted {
            // Copied out so that no slot is locked while the maps below are.
            let (users, temp) = {
                let old = lock(&old.state);
                (old.users(), old.stored.message.temp_message_id.clone())
            };
            // The inboxes that held it let go of it too (it is mostly at their front), so
            // the store keeps about `capacity` messages however many users there are; an
            // inbox left empty goes. The sender's (the first) lets go of its claim.
            for (i, user) in users.iter().enumerate() {
                // One lookup: trimmed, and dropped when empty. The floor is raised under the
                // map's lock, before the user can get a new inbox.
                self.inboxes.remove_if_mut(user, |_, inbox| {
                    if let Some(t) = temp.as_deref().filter(|_| i == 0) {
                        inbox.let_go(t, &old);
                    }
                    inbox.trim(self.inbox_max_entries);
                    let empty = inbox.entries.is_empty() && inbox.claims.is_empty();
                    if empty {
                        self.floor(user).fetch_max(inbox.latest, Ordering::Relaxed);
                    }
                    empty
                });
            }
        }
        Ok(SaveOutcome::Saved(stored))
    }

    async fn mark_read(
        &self,
        reader_id: &str,
        chat_id: &str,
        message_id: &str,
    ) -> Result<Receipt, StoreError> {
        let unknown = || StoreError::UnknownMessage(message_id.to_string(), chat_id.to_string());
        let slot = self.slot(message_id).ok_or_else(unknown)?;
        let mut state = lock(&slot.state);
        let m = &state.stored.message;
        if m.group {
            if m.chat_id != chat_id {
                return Err(unknown());
            }
            if m.sender_id == reader_id {
                return Err(StoreError::NotReceiver(message_id.to_string()));
            }
            if !state.stored.member_seqs.iter().any(|(u, _)| u == reader_id) {
                return Err(unknown());
            }
            let seq = match state.reads.iter().find(|(u, ..)| u == reader_id) {
                Some((_, _, seq)) => *seq,
                None => {
                    let sender = m.sender_id.clone();
                    let reader: Arc<str> = reader_id.into();
                    let entry = (EntryKind::Receipt, slot.clone(), Some(reader));
                    let seq = self.append_entry(&sender, entry);
                    state.reads.push((reader_id.to_string(), now_ms(), seq));
                    seq
                }
            };
            return Ok(Receipt {
                message: state.view(reader_id),
                seq,
                reader_id: reader_id.to_string(),
            });
        }
        // As in the Redis store, which keeps a message only with its two users: to anyone
        // else it does not exist.
        if m.chat_id != chat_id || (m.sender_id != reader_id && m.receiver_id != reader_id) {
            return Err(unknown());
        }
        if m.receiver_id != reader_id {
            return Err(StoreError::NotReceiver(message_id.to_string()));
        }
        if state.stored.read_at.is_none() {
            state.stored.read_at = Some(now_ms());
            let sender = state.stored.message.sender_id.clone();
            state.receipt_seq = self.append(&sender, EntryKind::Receipt, &slot);
        }
        Ok(Receipt {
            message: state.stored.clone(),
            seq: state.receipt_seq,
            reader_id: reader_id.to_string(),
        })
    }

    async fn fetch(
        &self,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let (oldest, latest, picked) = match self.inboxes.get(user_id) {
            // Never seen, or dropped when its messages were evicted: nothing kept up to its floor.
            None => {
                let floor = self.floor(user_id).load(Ordering::Relaxed);
                (floor + 1, floor, Vec::new())
            }
            Some(inbox) => {
                let oldest = inbox.oldest();
                let skip = after.saturating_add(1).saturating_sub(oldest) as usize;
                let picked: Vec<_> = inbox
                    .entries
                    .iter()
                    .skip(skip)
                    .take(limit.min(MAX_PAGE))
                    .cloned()
                    .collect();
                (oldest, inbox.latest, picked)
            }
        };
        let first = oldest.max(after.saturating_add(1));
        let entries = picked
            .into_iter()
            .enumerate()
            .map(|(i, (kind, slot, reader))| {
                let state = lock(&slot.state);
                let message = state.view(user_id);
                let reader_id = match (kind, reader) {
                    (EntryKind::Message, _) => String::new(),
                    (EntryKind::Receipt, Some(r)) => r.to_string(),
                    (EntryKind::Receipt, None) => message.message.receiver_id.clone(),
                };
                InboxEntry {
                    seq: first + i as u64,
                    kind,
                    message,
                    reader_id,
                }
            })
            .collect();
        Ok(InboxPage {
            entries,
            oldest,
            latest,
        })
    }

    /// Read from the user's inbox, newest first, keeping the chat's messages: the in-process
    /// store keeps no index per chat, so its history is what the inbox still holds (at most
    /// `store.inbox_max_entries` places), and a page costs a walk of the inbox.
    async fn fetch_chat(
        &self,
        user_id: &str,
        chat_id: &str,
        before: Option<&str>,
        limit: usize,
    ) -> Result<ChatPage, StoreError> {
        // The messages' places, copied out: a slot is never locked while an inbox is.
        let places: Vec<(u64, Arc<Slot>)> = match self.inboxes.get(user_id) {
            None => Vec::new(),
            Some(inbox) => {
                let oldest = inbox.oldest();
                (oldest..)
                    .zip(inbox.entries.iter())
                    .filter(|(_, (kind, ..))| *kind == EntryKind::Message)
                    .map(|(seq, (_, slot, _))| (seq, slot.clone()))
                    .collect()
            }
        };
        let limit = limit.min(MAX_HISTORY_PAGE);
        let (mut member, mut past_cursor) = (false, before.is_none());
        let mut page = ChatPage::default();
        for (seq, slot) in places.into_iter().rev() {
            if slot.evicted.load(Ordering::Relaxed) {
                continue;
            }
            let stored = {
                let state = lock(&slot.state);
                if state.stored.message.chat_id != chat_id {
                    continue;
                }
                state.view(user_id)
            };
            member = true;
            if !past_cursor {
                past_cursor = before == Some(stored.message.message_id.as_str());
                continue;
            }
            if page.messages.len() == limit {
                page.more = true;
                break;
            }
            page.messages.push(HistoryMessage {
                message: stored,
                seq,
            });
        }
        if !member {
            return Err(StoreError::NotMember(user_id.into(), chat_id.into()));
        }
        if !past_cursor {
            let before = before.unwrap_or_default();
            return Err(StoreError::UnknownMessage(before.into(), chat_id.into()));
        }
        Ok(page)
    }

    async fn create_group(
        &self,
        group_id: &str,
        creator: &str,
        members: &[String],
    ) -> Result<Vec<Member>, StoreError> {
        let roster = group_roster(group_id, creator, members, self.group_max_members)?;
        match lock(&self.groups).entry(group_id.to_string()) {
            MapEntry::Occupied(_) => Err(StoreError::GroupExists(group_id.to_string())),
            MapEntry::Vacant(e) => Ok(e.insert(roster).clone()),
        }
    }

    async fn change_member(
        &self,
        group_id: &str,
        by: &str,
        user_id: &str,
        change: MemberChange,
    ) -> Result<Vec<Member>, StoreError> {
        let mut groups = lock(&self.groups);
        let members = groups
            .get_mut(group_id)
            .ok_or_else(|| StoreError::NoSuchGroup(group_id.to_string()))?;
        super::apply_change(
            group_id,
            members,
            by,
            user_id,
            change,
            self.group_max_members,
        )?;
        let after = members.clone();
        if after.is_empty() {
            groups.remove(group_id);
        }
        Ok(after)
    }

    async fn members(&self, group_id: &str, asking: &str) -> Result<Vec<Member>, StoreError> {
        let groups = lock(&self.groups);
        let members = groups
            .get(group_id)
            .ok_or_else(|| StoreError::NoSuchGroup(group_id.to_string()))?;
        if !members.iter().any(|m| m.user_id == asking) {
            return Err(StoreError::NotInGroup(asking.into(), group_id.into()));
        }
        Ok(members.clone())
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
            group: false,
        }
    }

    #[tokio::test]
    async fn a_cursor_at_the_largest_seq_gets_nothing_and_no_overflow() {
        let s = MemoryStore::new(100, 100);
        s.save(msg("m1", None)).await.unwrap();
        let page = s.fetch("b", u64::MAX, 10).await.unwrap();
        assert!(page.entries.is_empty());
        assert_eq!(page.latest, 1);
    }

    #[tokio::test]
    async fn save_is_idempotent_on_sender_and_temp_id() {
        let s = MemoryStore::new(100, 100);
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
        // The same id again (a MessageService's client retrying a lost answer), with or
        // without its tempMessageId: the first, at its places, and no new place.
        for retry in [msg("m4", None), msg("m1", Some("t"))] {
            match s.save(retry.clone()).await.unwrap() {
                SaveOutcome::Duplicate(m) => assert_eq!(m.message.message_id, retry.message_id),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(s.fetch("b", 0, 10).await.unwrap().latest, 3);
    }

    #[tokio::test]
    async fn mark_read_checks_chat_and_reader() {
        let s = MemoryStore::new(100, 100);
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
            s.mark_read("eve", "c", "m1").await,
            Err(StoreError::UnknownMessage(..))
        ));
        assert!(matches!(
            s.mark_read("b", "c", "nope").await,
            Err(StoreError::UnknownMessage(..))
        ));
        let read = s.mark_read("b", "c", "m1").await.unwrap();
        assert!(read.message.read_at.is_some());
        assert_eq!(read.message.message.sender_id, "a");
        // The receipt takes the next place in the sender's inbox, once.
        assert_eq!(read.seq, 2);
        assert_eq!(s.mark_read("b", "c", "m1").await.unwrap(), read);
    }

    #[tokio::test]
    async fn keeps_about_capacity_messages() {
        let s = MemoryStore::new(64, 100);
        for i in 0..10_000 {
            s.save(msg(&format!("m{i}"), Some(&format!("t{i}"))))
                .await
                .unwrap();
        }
        let kept: usize = s.shards.iter().map(|sh| lock(sh).messages.len()).sum();
        assert!(kept <= 64 + SHARDS, "{kept}");
        let claims: usize = s.inboxes.iter().map(|i| i.claims.len()).sum();
        assert!(claims <= 64 + SHARDS, "{claims}");
        assert!(s.get("m9999").is_some());
    }

    fn between(id: &str, from: &str, to: &str) -> NewMessage {
        NewMessage {
            sender_id: from.into(),
            receiver_id: to.into(),
            ..msg(id, None)
        }
    }

    fn seqs(page: &InboxPage) -> Vec<u64> {
        page.entries.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn inbox_numbers_every_message_a_user_sees_without_gaps() {
        let s = MemoryStore::new(100, 100);
        s.save(between("m1", "a", "b")).await.unwrap();
        s.save(between("m2", "c", "b")).await.unwrap();
        s.save(between("m3", "b", "a")).await.unwrap();
        s.save(between("m4", "b", "b")).await.unwrap();
        let b = s.fetch("b", 0, 10).await.unwrap();
        assert_eq!(seqs(&b), [1, 2, 3, 4]);
        let ids: Vec<_> = b
            .entries
            .iter()
            .map(|e| &e.message.message.message_id[..])
            .collect();
        assert_eq!(ids, ["m1", "m2", "m3", "m4"]);
        assert_eq!((b.oldest, b.latest), (1, 4));
        // A retry of a stored message keeps its places.
        match s.save(between("m3", "b", "a")).await.unwrap() {
            SaveOutcome::Duplicate(m) => assert_eq!((m.receiver_seq, m.sender_seq), (2, 3)),
            other => panic!("{other:?}"),
        }
        // Paged after a cursor.
        assert_eq!(seqs(&s.fetch("b", 1, 2).await.unwrap()), [2, 3]);
        assert_eq!(seqs(&s.fetch("b", 4, 2).await.unwrap()), Vec::<u64>::new());
        let a = s.fetch("a", 0, 0).await.unwrap();
        assert!(a.entries.is_empty());
        assert_eq!((a.oldest, a.latest), (1, 2));
        let nobody = s.fetch("nobody", 0, 10).await.unwrap();
        assert_eq!((nobody.oldest, nobody.latest), (1, 0));
    }

    #[tokio::test]
    async fn inboxes_let_go_of_evicted_messages() {
        let s = MemoryStore::new(64, 100);
        for i in 0..5_000 {
            // Every message to a user of its own: no later save touches that inbox again.
            s.save(between(&format!("m{i}"), "a", &format!("u{i}")))
                .await
                .unwrap();
        }
        let held: usize = s.inboxes.iter().map(|i| i.entries.len()).sum();
        // The sender's inbox and the receivers' together: about twice the capacity.
        assert!(held <= 2 * (64 + SHARDS) + 100, "{held}");
        // u0's one message is gone and says so (its floor is at least 1: a user whose inbox
        // was dropped into the same bucket may have raised it further).
        let gone = s.fetch("u0", 0, 10).await.unwrap();
        assert!(gone.latest >= 1 && gone.entries.is_empty(), "{gone:?}");
        assert_eq!(gone.oldest, gone.latest + 1);
    }

    #[tokio::test]
    async fn a_trimmed_inbox_says_what_it_no_longer_keeps() {
        let s = MemoryStore::new(1000, 3);
        for i in 0..5 {
            s.save(between(&format!("m{i}"), "a", "b")).await.unwrap();
        }
        let b = s.fetch("b", 0, 10).await.unwrap();
        assert_eq!((b.oldest, b.latest), (3, 5));
        assert_eq!(seqs(&b), [3, 4, 5]);
    }

    #[test]
    fn retries_racing_the_eviction_of_their_own_message_never_deadlock() {
        // A tiny store (one message per shard) and a few temp ids retried by four threads:
        // a retry finds its key while another thread evicts the message the key points at.
        let s = Arc::new(MemoryStore::new(SHARDS, 100));
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..4 {
            let s = s.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                for i in 0..100_000 {
                    // Half retries of a few keys, half fresh messages that push them out.
                    let temp = (i % 2 == 0).then(|| format!("t{}", i % 8));
                    let m = msg(&format!("m{t}-{i}"), temp.as_deref());
                    rt.block_on(s.save(m)).unwrap();
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            // Generous: the loop takes well under a second; a deadlock never ends.
            finished
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("a saving thread is stuck: lock order");
        }
    }

    #[tokio::test]
    async fn a_claim_whose_message_was_stored_before_under_its_id_is_let_go() {
        let s = MemoryStore::new(100, 100);
        s.save(msg("m1", None)).await.unwrap();
        // The same id again, now with a tempMessageId: the stored one is the answer...
        let again = s.save(msg("m1", Some("t1"))).await.unwrap();
        assert!(matches!(again, SaveOutcome::Duplicate(_)), "{again:?}");
        // ...and t1 holds nothing: a new send under it is stored, with its places.
        match s.save(msg("m2", Some("t1"))).await.unwrap() {
            SaveOutcome::Saved(m) => assert!(m.receiver_seq > 0 && m.sender_seq > 0, "{m:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn racing_retries_of_one_send_store_it_once() {
        // Four threads send the same tempMessageId at once, each with its own message id (as
        // four nodes would retry one send): one is stored, the others answer that one, even
        // while it is still being placed.
        let s = Arc::new(MemoryStore::new(100_000, 100));
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (s, start) = (s.clone(), start.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    (0..2_000)
                        .map(|i| {
                            start.wait();
                            let m = msg(&format!("m{t}-{i}"), Some(&format!("t{i}")));
                            match rt.block_on(s.save(m)).unwrap() {
                                SaveOutcome::Saved(m) => (true, m.message.message_id.clone()),
                                SaveOutcome::Duplicate(m) => (false, m.message.message_id.clone()),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let answers: Vec<Vec<(bool, String)>> =
            threads.into_iter().map(|t| t.join().unwrap()).collect();
        for i in 0..2_000 {
            let saved = answers.iter().filter(|a| a[i].0).count();
            assert_eq!(saved, 1, "send t{i} stored {saved} times");
            let ids: std::collections::HashSet<_> = answers.iter().map(|a| &a[i].1).collect();
            assert_eq!(ids.len(), 1, "send t{i} answered as {ids:?}");
        }
    }

    #[tokio::test]
    async fn made_up_receivers_do_not_grow_the_inbox_map_and_seqs_never_go_back() {
        let s = MemoryStore::new(64, 100);
        s.save(between("first", "a", "x")).await.unwrap();
        for i in 0..20_000 {
            s.save(between(&format!("m{i}"), "a", &format!("fresh{i}")))
                .await
                .unwrap();
        }
        assert!(s.inboxes.len() <= 2 * (64 + SHARDS), "{}", s.inboxes.len());
        // x's inbox went with its only message; its next message still gets a later seq.
        let again = s.save(between("again", "a", "x")).await.unwrap();
        match again {
            SaveOutcome::Saved(m) => assert!(m.receiver_seq > 1, "{}", m.receiver_seq),
            other => panic!("{other:?}"),
        }
    }
}
