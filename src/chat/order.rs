//! In-order, exactly-once delivery to one device. Every frame that has a place in a user's
//! inbox (a message, a copy of one the user sent, a read receipt, the ack of the device's own
//! send) carries its `seq`. Live frames reach a node by different paths (this node, the
//! broker from other nodes) and so not always in seq order; a device that reconnects must get
//! what it missed before anything newer. [`Order`] is the per-device state that decides, for
//! each frame, whether it goes out now, is a duplicate, or waits for the gap before it to be
//! filled from the store (by the catch-up task in `sync`).
//!
//! Pure state, no I/O: the session handle holds it behind a lock.

use std::collections::BTreeMap;

use axum::extract::ws::Utf8Bytes;

use crate::bus::FrameKind;

/// A frame that waits for the ones before it.
#[derive(Debug, Clone)]
pub struct Held {
    pub frame: Utf8Bytes,
    pub kind: FrameKind,
    /// The ack of this device's own send: it goes out even when the device already has its
    /// seq (from a replay), because the device waits for it.
    pub ack: bool,
}

/// What to do with one frame offered to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It is the next one: send it now (the cursor has moved on to it).
    Send,
    /// The device has had this seq already.
    Duplicate,
    /// Kept until the frames before it arrive; a catch-up is already running.
    Held,
    /// Kept, and there is a gap before it: start a catch-up from the store.
    CatchUp,
    /// More frames wait than the device may hold: it is too far behind; close it so that
    /// it reconnects and syncs from its cursor.
    Overflow,
}

/// What to do with an entry fetched from the store.
#[derive(Debug, Clone)]
pub enum Fetched {
    /// The device has it.
    Skip,
    /// Send the entry.
    Send,
    /// Send this held ack in its place.
    SendHeld(Held),
}

/// One device's place in its user's inbox.
#[derive(Debug, Default)]
pub struct Order {
    /// The last seq this device was sent; `None` until known.
    cursor: Option<u64>,
    held: BTreeMap<u64, Held>,
    /// A catch-up task owns sending while this is set: live frames are held.
    catching_up: bool,
    /// The running catch-up ends with `SYNCED` (the device asked for a replay).
    announce: bool,
    /// The device rewound its cursor: the running catch-up must fetch again.
    refetch: bool,
}

impl Order {
    /// A new session: frames are held until its starting cursor is known.
    pub fn starting() -> Self {
        Self {
            catching_up: true,
            ..Self::default()
        }
    }

    pub fn cursor(&self) -> Option<u64> {
        self.cursor
    }

    pub fn is_catching_up(&self) -> bool {
        self.catching_up
    }

    /// A frame at `seq` arrives for this device.
    pub fn offer(&mut self, seq: u64, held: Held, max_held: usize) -> Decision {
        if let Some(cursor) = self.cursor {
            if seq <= cursor {
                return Decision::Duplicate;
            }
        }
        let next = self.cursor.is_none_or(|c| seq == c + 1);
        if next && !self.catching_up {
            // With no cursor yet (the store was down when the session began) the first frame
            // starts it.
            self.cursor = Some(seq);
            return Decision::Send;
        }
        if self.held.len() >= max_held && self.cursor.is_some() {
            // A burst (a backlog the broker hands over at once) the device cannot take yet:
            // every held frame but the acks is in the store, so it is let go and fetched
            // again from the cursor, rather than held without bound or the device closed.
            self.held.retain(|_, h| h.ack);
            self.refetch = true;
        }
        if self.held.len() >= max_held {
            // Acks alone (never dropped), or no cursor to fetch again from: too far behind.
            return Decision::Overflow;
        }
        self.held.insert(seq, held);
        if self.catching_up {
            Decision::Held
        } else {
            self.catching_up = true;
            Decision::CatchUp
        }
    }

    /// The ack of the device's own send: like [`offer`](Self::offer), but an ack the device
    /// already has the seq of is still sent (`Send`), never dropped.
    pub fn offer_ack(&mut self, seq: u64, held: Held, max_held: usize) -> Decision {
        match self.offer(seq, held, max_held) {
            Decision::Duplicate => Decision::Send,
            d => d,
        }
    }

    /// Starts a catch-up unless one runs; returns whether the caller must run it.
    pub fn begin_catch_up(&mut self, announce: bool) -> bool {
        self.announce |= announce;
        !std::mem::replace(&mut self.catching_up, true)
    }

    /// The device asks for everything after `since` (`SYNC`): returns whether the caller must
    /// start a catch-up (none runs), which ends with `SYNCED`.
    pub fn rewind(&mut self, since: u64) -> bool {
        self.cursor = Some(since);
        self.refetch = true;
        self.begin_catch_up(true)
    }

    /// Whether the device rewound since the catch-up last looked.
    pub fn take_refetch(&mut self) -> bool {
        std::mem::take(&mut self.refetch)
    }

    /// Sets the starting cursor of a new session to `latest` (the newest seq in the store
    /// when it began), or just before the first frame held since, whichever is lower: nothing
    /// delivered after the session was registered is skipped.
    pub fn start_at(&mut self, latest: Option<u64>) {
        if self.cursor.is_some() {
            // The device sent SYNC before its start was known: its cursor stands.
            return;
        }
        let first_held = self.held.keys().next().map(|s| s - 1);
        self.cursor = match (latest, first_held) {
            (Some(l), Some(h)) => Some(l.min(h)),
            (l, h) => l.or(h),
        };
    }

    /// Moves the cursor back to `seq`, the end of the inbox (the device's cursor was ahead of
    /// a store that was reset).
    pub fn reset_to(&mut self, seq: u64) {
        self.cursor = Some(seq);
    }

    /// Moves the cursor forward to `seq` (the store no longer keeps what lies between).
    pub fn skip_to(&mut self, seq: u64) {
        if self.cursor.is_none_or(|c| c < seq) {
            self.cursor = Some(seq);
        }
    }

    /// Takes an entry fetched from the store at `seq` if the device needs it. A held live
    /// copy of it is dropped, but a held ack is sent instead of the entry: the sending
    /// device waits for its ack.
    pub fn take_fetched(&mut self, seq: u64) -> Fetched {
        if self.cursor.is_some_and(|c| seq <= c) {
            return Fetched::Skip;
        }
        self.cursor = Some(seq);
        match self.held.remove(&seq) {
            Some(held) if held.ack => Fetched::SendHeld(held),
            _ => Fetched::Send,
        }
    }

    /// The next held frame to send, if it is the next one: held duplicates are dropped on
    /// the way (acks among them are returned: they are always sent).
    pub fn pop_ready(&mut self) -> Option<Held> {
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            match self.cursor {
                Some(c) if seq <= c => {
                    let held = entry.remove();
                    if held.ack {
                        return Some(held);
                    }
                }
                Some(c) if seq == c + 1 => {
                    self.cursor = Some(seq);
                    return Some(entry.remove());
                }
                None => {
                    self.cursor = Some(seq);
                    return Some(entry.remove());
                }
                Some(_) => return None,
            }
        }
        None
    }

    /// The first held seq, when a gap lies before it.
    pub fn gap_before(&self) -> Option<u64> {
        self.held.keys().next().copied()
    }

    /// Ends the catch-up when nothing is held and no rewind waits; returns whether it
    /// ended (else the caller goes on).
    pub fn try_finish(&mut self) -> bool {
        if !self.held.is_empty() || self.refetch {
            return false;
        }
        self.catching_up = false;
        self.announce = false;
        true
    }

    /// Whether the running catch-up must announce its end (without clearing it).
    pub fn wants_announce(&self) -> bool {
        self.announce
    }

    /// Gives up catching up for now (the store is down): frames stay held until the next
    /// catch-up.
    pub fn suspend(&mut self) {
        self.catching_up = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(seq: u64) -> Held {
        Held {
            frame: Utf8Bytes::from(format!("{seq}")),
            kind: FrameKind::Chat,
            ack: false,
        }
    }

    fn ready(o: &mut Order) -> Vec<String> {
        std::iter::from_fn(|| o.pop_ready())
            .map(|h| h.frame.to_string())
            .collect()
    }

    #[test]
    fn in_order_frames_go_straight_out_and_repeats_are_dropped() {
        let mut o = Order::starting();
        o.start_at(Some(4));
        assert!(o.try_finish());
        assert_eq!(o.offer(5, f(5), 8), Decision::Send);
        assert_eq!(o.offer(6, f(6), 8), Decision::Send);
        assert_eq!(o.offer(6, f(6), 8), Decision::Duplicate);
        assert_eq!(o.offer(3, f(3), 8), Decision::Duplicate);
        assert_eq!(o.cursor(), Some(6));
    }

    #[test]
    fn a_gap_holds_later_frames_until_the_store_fills_it() {
        let mut o = Order::starting();
        o.start_at(Some(0));
        o.try_finish();
        assert_eq!(o.offer(2, f(2), 8), Decision::CatchUp);
        assert_eq!(o.offer(3, f(3), 8), Decision::Held);
        // The catch-up fetches 1..=3 from the store; the held live copies are not sent twice.
        assert!(matches!(o.take_fetched(1), Fetched::Send));
        assert!(matches!(o.take_fetched(2), Fetched::Send));
        assert!(ready(&mut o) == ["3"]);
        assert!(matches!(o.take_fetched(3), Fetched::Skip));
        assert!(o.try_finish());
        assert_eq!(o.offer(4, f(4), 8), Decision::Send);
    }

    #[test]
    fn frames_during_the_start_are_held_and_none_is_skipped() {
        let mut o = Order::starting();
        assert_eq!(o.offer(7, f(7), 8), Decision::Held);
        assert_eq!(o.offer(8, f(8), 8), Decision::Held);
        // The store said 8 when asked, but 7 arrived after the session was registered.
        o.start_at(Some(8));
        assert_eq!(o.cursor(), Some(6));
        assert_eq!(ready(&mut o), ["7", "8"]);
        assert!(o.try_finish());
    }

    #[test]
    fn an_ack_is_sent_even_when_the_replay_gave_its_seq_already() {
        let mut o = Order::starting();
        o.start_at(Some(5));
        o.try_finish();
        assert_eq!(o.offer_ack(4, f(4), 8), Decision::Send);
        assert_eq!(o.cursor(), Some(5));
        assert!(o.begin_catch_up(false));
        let ack = Held { ack: true, ..f(5) };
        assert_eq!(o.offer_ack(5, ack, 8), Decision::Send);
    }

    #[test]
    fn a_held_ack_goes_out_in_place_of_the_fetched_copy() {
        let mut o = Order::starting();
        o.start_at(Some(0));
        o.try_finish();
        assert!(o.begin_catch_up(false));
        let ack = Held { ack: true, ..f(1) };
        assert_eq!(o.offer_ack(1, ack, 8), Decision::Held);
        match o.take_fetched(1) {
            Fetched::SendHeld(h) => assert!(h.ack),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn too_many_held_frames_are_fetched_again_from_the_store() {
        let mut o = Order::starting();
        o.start_at(Some(0));
        o.try_finish();
        assert_eq!(o.offer(5, f(5), 2), Decision::CatchUp);
        assert_eq!(o.offer(6, f(6), 2), Decision::Held);
        // Over the limit: what was held is let go (it is in the store) and fetched again.
        assert_eq!(o.offer(7, f(7), 2), Decision::Held);
        assert!(o.take_refetch());
        assert_eq!(o.gap_before(), Some(7));
    }

    #[test]
    fn held_acks_are_never_let_go() {
        let mut o = Order::starting();
        o.start_at(Some(0));
        o.try_finish();
        let ack = |seq| Held {
            ack: true,
            ..f(seq)
        };
        assert_eq!(o.offer_ack(5, ack(5), 2), Decision::CatchUp);
        assert_eq!(o.offer_ack(6, ack(6), 2), Decision::Held);
        assert_eq!(o.offer(7, f(7), 2), Decision::Overflow);
    }

    #[test]
    fn without_a_cursor_too_many_held_frames_overflow() {
        let mut o = Order::starting();
        assert_eq!(o.offer(5, f(5), 2), Decision::Held);
        assert_eq!(o.offer(6, f(6), 2), Decision::Held);
        assert_eq!(o.offer(7, f(7), 2), Decision::Overflow);
    }

    #[test]
    fn a_sync_sent_before_the_start_is_known_wins() {
        let mut o = Order::starting();
        assert!(!o.rewind(3));
        o.start_at(Some(10));
        assert_eq!(o.cursor(), Some(3));
        assert!(o.take_refetch());
    }

    #[test]
    fn sync_rewinds_and_announces() {
        let mut o = Order::starting();
        o.start_at(Some(9));
        o.try_finish();
        assert!(o.rewind(2));
        assert_eq!(o.cursor(), Some(2));
        assert!(!o.rewind(3));
        assert!(!o.try_finish(), "a rewind asks for a fetch first");
        assert!(o.take_refetch());
        assert!(o.wants_announce());
        assert!(o.try_finish());
        assert!(!o.wants_announce());
    }

    #[test]
    fn without_a_starting_cursor_the_first_frame_starts_it() {
        let mut o = Order::starting();
        o.start_at(None);
        o.try_finish();
        assert_eq!(o.offer(12, f(12), 8), Decision::Send);
        assert_eq!(o.offer(14, f(14), 8), Decision::CatchUp);
    }
}
