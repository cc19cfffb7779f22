//! Sync: a device gets everything in its user's inbox after its cursor, in seq order, then
//! live frames, with no gap and no duplicate at the seam. The same catch-up fills a gap in
//! live delivery (frames that took different paths, a publish that failed) from the store.
//!
//! The seam holds because a session is registered (and so receives every live frame from
//! then on, held in [`Order`](super::order::Order) while a catch-up runs) before the store is
//! asked what it has; and because a seq exists in the store only together with its message.

use std::collections::HashMap;
use std::sync::Weak;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;

use super::order::Fetched;
use super::registry::SessionHandle;
use super::{route, Node, REPLY_PATIENCE};
use crate::backoff::Backoff;
use crate::protocol::{ErrorCode, FrameError, ServerFrame};
use crate::store::{EntryKind, InboxEntry, InboxPage, StoreError};

/// Most heartbeats whose devices are looked at together (see [`probe_heartbeats`]).
const PROBE_BATCH: usize = 1024;
/// How long heartbeats gather before one look at their users' newest seqs.
const PROBE_LINGER: Duration = Duration::from_millis(20);

/// Entries asked for per store call during a catch-up.
const PAGE: usize = 500;
/// Store calls per page before the catch-up gives up for now (the node's own retries of a
/// gRPC store come on top).
const FETCH_ATTEMPTS: u32 = 3;
/// Fetches that find nothing new while frames wait behind a gap before the gap counts as
/// lost (the store forgot entries it had given out: an in-memory MessageService restarted).
const MAX_STALLS: u32 = 3;
/// The pause before fetching again when a fetch found nothing new behind a gap (the missing
/// frame may still be on its way into the store).
const STALL: Backoff = Backoff::new(Duration::from_millis(40), Duration::from_millis(160));
/// The pause before another attempt of a fetch that failed.
const FETCH_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));

fn entry_frame(entry: &InboxEntry, user_id: &str) -> Utf8Bytes {
    match entry.kind {
        EntryKind::Message => route::chat_frame(&entry.message.message, entry.seq, user_id),
        EntryKind::Receipt => {
            route::receipt_frame(&entry.message.message, &entry.reader_id, entry.seq)
        }
    }
}

impl Node {
    /// The newest seq of a user's inbox, asked before a session without `since` is
    /// registered: where it starts ([`begin_sync`](Self::begin_sync)). `None` when the store
    /// does not answer.
    pub async fn inbox_position(&self, user_id: &str) -> Option<u64> {
        match self.fetch(user_id, 0, 0).await {
            Ok(page) => Some(page.latest),
            Err(e) => {
                tracing::warn!(user = %user_id, "inbox position unknown ({e}); starting from the first live frame");
                None
            }
        }
    }

    /// Starts a new session's place in the inbox, in the background: with `since`, a replay
    /// of everything after it (ending with `SYNCED`); without, from `newest`, the newest seq
    /// asked before the session was registered ([`inbox_position`](Self::inbox_position)),
    /// with what was stored between that answer and the registration fetched: asked after
    /// the registration instead, the answer could already count a message stored meanwhile
    /// whose live frame had not arrived yet, and that frame was then dropped as one the
    /// device had (CI saw a first cross-node message never delivered). The session must
    /// already be registered.
    pub fn begin_sync(&self, handle: &SessionHandle, since: Option<u64>, newest: Option<u64>) {
        let Some(node) = self.me.upgrade() else {
            return;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            // A new session is catching up already: this task is that catch-up.
            let fetch_first = match since {
                Some(since) => {
                    handle.order().rewind(since);
                    true
                }
                None => {
                    handle.order().start_at(newest);
                    newest.is_some()
                }
            };
            node.catch_up(&handle, fetch_first).await;
        });
    }

    /// `SYNC`: replay everything after `since`, then `SYNCED`.
    pub fn handle_sync(&self, handle: &SessionHandle, since: u64) {
        if handle.order().rewind(since) {
            self.spawn_catch_up(handle);
        }
    }

    /// A device's heartbeat: queued for the next look at what it may have missed (see
    /// [`probe_heartbeats`]).
    pub fn heartbeat_probe(&self, handle: &SessionHandle) {
        if handle.order().cursor().is_some() {
            let _ = self.probes.send(handle.clone());
        }
    }

    /// The devices of some heartbeats: their users' newest seqs in one store call, and a
    /// catch-up for each device that is behind (a publish to this node failed). Were the
    /// store not to answer, every device looks for itself, as each catch-up reports.
    async fn probe_behind(&self, handles: Vec<SessionHandle>) {
        let mut users: Vec<&str> = handles.iter().map(|h| h.user_id.as_ref()).collect();
        users.sort_unstable();
        users.dedup();
        let latest: HashMap<&str, u64> = match self.backends.store.latest_seqs(&users).await {
            Ok(seqs) => users.iter().copied().zip(seqs).collect(),
            Err(e) => {
                tracing::debug!("newest seqs unknown ({e}); each device looks for itself");
                HashMap::new()
            }
        };
        for h in &handles {
            let cursor = h.order().cursor();
            let behind = match (cursor, latest.get(h.user_id.as_ref())) {
                (Some(cursor), Some(&newest)) => cursor < newest,
                _ => true,
            };
            if behind {
                self.probe_inbox(h);
            }
        }
    }

    /// Looks for anything the device should have but was not sent (a publish to this node
    /// that failed), unless a catch-up runs already.
    pub fn probe_inbox(&self, handle: &SessionHandle) {
        let start = {
            let mut order = handle.order();
            order.cursor().is_some() && order.begin_catch_up(false)
        };
        if start {
            self.spawn_catch_up(handle);
        }
    }

    /// Every local device looks for what it may have missed (the bus was away: frames
    /// published to this node meanwhile are lost to it, not to the store).
    pub fn catch_up_everyone(&self) {
        let sessions = self.sessions.all();
        tracing::info!(
            sessions = sessions.len(),
            "the bus is back: local devices catch up from the store"
        );
        for h in &sessions {
            self.probe_inbox(h);
        }
    }

    pub(super) fn spawn_catch_up(&self, handle: &SessionHandle) {
        let Some(node) = self.me.upgrade() else {
            return;
        };
        let handle = handle.clone();
        tokio::spawn(async move { node.catch_up(&handle, true).await });
    }

    /// Sends the device what it misses, from the store and from what is held, in order,
    /// until nothing waits; then live frames flow directly again. Only one runs per session.
    pub(super) async fn catch_up(&self, h: &SessionHandle, fetch_first: bool) {
        let mut replayed = 0u64;
        let mut stalls = 0u32;
        let mut fetch = fetch_first;
        loop {
            if h.is_closing() {
                h.order().suspend();
                return;
            }
            fetch |= h.order().take_refetch();
            let cursor = h.order().cursor();
            if let (true, Some(after)) = (fetch, cursor) {
                fetch = false;
                let page = match self.fetch(&h.user_id, after, PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        // Held frames stay held; the next heartbeat (or frame) tries again.
                        let asked = {
                            let mut order = h.order();
                            order.suspend();
                            order.wants_announce()
                        };
                        tracing::warn!(user = %h.user_id, "catch-up from the store failed: {e}");
                        if !asked {
                            // A probe or a gap the device does not know of: no need to tell it.
                            return;
                        }
                        let e = FrameError::new(
                            ErrorCode::StoreUnavailable,
                            format!("missed messages could not be fetched ({e}); they are kept: send SYNC with your last seq to retry"),
                        );
                        return self.reply_error(h, &e).await;
                    }
                };
                if page.latest < after {
                    // The store never gave out this seq: it was reset (an in-memory store
                    // restarted), or the cursor belongs to another cluster.
                    h.order().reset_to(page.latest);
                    let e = FrameError::new(
                        ErrorCode::CursorAhead,
                        format!(
                            "seq {after} is ahead of your inbox, which ends at {}: the store was reset or this is another cluster; going on from {}",
                            page.latest, page.latest
                        ),
                    );
                    self.reply_error(h, &e).await;
                    fetch = true;
                    continue;
                }
                if page.oldest > after + 1 {
                    h.order().skip_to(page.oldest - 1);
                    self.metrics.sync_too_old.inc();
                    let mut e = FrameError::new(
                        ErrorCode::SyncTooOld,
                        format!(
                            "seq {}..{} of your inbox are no longer kept (it keeps {}..{}); page back through each chat with HISTORY for them: the replay goes on from {}",
                            after + 1,
                            page.oldest - 1,
                            page.oldest,
                            page.latest,
                            page.oldest
                        ),
                    );
                    e.missed = Some((after + 1, page.oldest - 1));
                    self.reply_error(h, &e).await;
                }
                let full = page.entries.len() >= PAGE;
                for entry in &page.entries {
                    let taken = h.order().take_fetched(entry.seq);
                    let frame = match taken {
                        Fetched::Skip => continue,
                        Fetched::Send => entry_frame(entry, &h.user_id),
                        Fetched::SendHeld(ack) => ack.frame,
                    };
                    h.reply(frame, REPLY_PATIENCE, &self.metrics).await;
                    replayed += 1;
                }
                self.metrics
                    .messages_replayed
                    .inc_by(page.entries.len() as u64);
                if full {
                    fetch = true;
                    continue;
                }
                let stalled = {
                    let order = h.order();
                    order.cursor() == Some(after) && order.gap_before().is_some()
                };
                if stalled {
                    stalls += 1;
                }
            }
            // What was held and is now next.
            loop {
                let next = h.order().pop_ready();
                match next {
                    Some(held) => h.reply(held.frame, REPLY_PATIENCE, &self.metrics).await,
                    None => break,
                }
            }
            let (gap, announce) = {
                let order = h.order();
                (order.gap_before(), order.wants_announce())
            };
            if let Some(first_held) = gap {
                if stalls >= MAX_STALLS {
                    // The store does not have what lies before the held frames: say so.
                    let cursor = {
                        let mut order = h.order();
                        let cursor = order.cursor().unwrap_or(0);
                        order.skip_to(first_held - 1);
                        cursor
                    };
                    self.metrics.sync_too_old.inc();
                    let mut e = FrameError::new(
                        ErrorCode::SyncTooOld,
                        format!(
                            "seq {}..{} of your inbox are not in the store; page back through each chat with HISTORY for them",
                            cursor + 1,
                            first_held - 1
                        ),
                    );
                    e.missed = Some((cursor + 1, first_held - 1));
                    self.reply_error(h, &e).await;
                    stalls = 0;
                } else {
                    if stalls > 0 {
                        STALL.wait(stalls - 1).await;
                    }
                    fetch = true;
                }
                continue;
            }
            if announce {
                let seq = h.order().cursor().unwrap_or(0);
                self.reply(h, &ServerFrame::Synced { seq, replayed }).await;
            }
            if h.order().try_finish() {
                return;
            }
        }
    }

    /// One page of `user_id`'s inbox, retried a few times with a short backoff.
    async fn fetch(
        &self,
        user_id: &str,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, StoreError> {
        let mut attempt = 0;
        loop {
            match self.backends.store.fetch(user_id, after, limit).await {
                Ok(page) => return Ok(page),
                Err(e) if attempt + 1 >= FETCH_ATTEMPTS => {
                    self.metrics.store_failures.inc();
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(user = user_id, "inbox fetch failed, retrying: {e}");
                    FETCH_RETRY.wait(attempt).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Looks at what the devices that sent a heartbeat may have missed, many at a time: what a
/// device missed arrives at its next heartbeat (within [`PROBE_LINGER`] more), as before, for
/// one store call per batch instead of an inbox fetch per heartbeat (that fetch cost the
/// MessageService and Redis more than a message did: `chatd bench --cluster --heartbeats`).
pub(super) async fn probe_heartbeats(
    node: Weak<Node>,
    mut rx: mpsc::UnboundedReceiver<SessionHandle>,
) {
    let mut batch = Vec::with_capacity(PROBE_BATCH);
    while rx.recv_many(&mut batch, PROBE_BATCH).await > 0 {
        tokio::time::sleep(PROBE_LINGER).await;
        while batch.len() < PROBE_BATCH {
            match rx.try_recv() {
                Ok(h) => batch.push(h),
                Err(_) => break,
            }
        }
        let Some(node) = node.upgrade() else { break };
        node.probe_behind(std::mem::take(&mut batch)).await;
    }
}
