//! The connections held by this node, by user, and the handle through which anything (the
//! node's own replies, other senders, the bus consumer) writes to one connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use tokio::sync::{mpsc, watch};

use super::metrics::Metrics;
use super::order::{Decision, Held, Order};
use super::outbox;
use crate::bus::FrameKind;

/// Close code for a reader whose outgoing queue is full (RFC 6455 1013, try again later).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// Why and how a session is being closed; the first reason given wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

/// Asks a session to close, without holding anything else of it.
pub struct Closer(Arc<watch::Sender<Option<CloseReason>>>);

impl Closer {
    /// Asks the session to close with this code; later requests do not override the first.
    pub fn request_close(&self, code: u16, reason: &str) {
        self.0.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(CloseReason {
                code,
                reason: reason.to_string(),
            });
            true
        });
    }
}

/// Everything other tasks need to reach one connection. Cheap to clone.
#[derive(Clone)]
pub struct SessionHandle {
    pub user_id: Arc<str>,
    pub connection_id: Arc<str>,
    /// Bounded queue of serialized frames to the socket writer.
    outbox: outbox::Sender<Utf8Bytes>,
    /// Set once to ask the session to close; both its reader and writer watch it.
    close: Arc<watch::Sender<Option<CloseReason>>>,
    /// Where this device is in its user's inbox, and the frames waiting for a gap to fill.
    order: Arc<Mutex<Order>>,
    /// Most frames that may wait for a gap before the device counts as too far behind.
    max_held: usize,
}

/// What [`SessionHandle::offer`] did with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offered {
    /// Queued to the socket, or held until the frames before it arrive.
    Accepted,
    /// Not for this device: it had this seq already, or it is being closed.
    Dropped,
    /// Held, with a gap before it: the caller starts a catch-up for this device.
    NeedsCatchUp,
    /// Next in order, but the device's queue is full: the caller waits for room (up to the
    /// reply patience) and then sends what was held meanwhile.
    Waits(Utf8Bytes),
}

/// What the session task keeps: the other ends of the handle's channels.
pub struct SessionEnds {
    pub outbox: outbox::Receiver<Utf8Bytes>,
    pub close: watch::Receiver<Option<CloseReason>>,
}

impl SessionHandle {
    pub fn new(user_id: &str, connection_id: &str, queue_len: usize) -> (Self, SessionEnds) {
        let (tx, rx) = outbox::channel(queue_len);
        let (close_tx, close_rx) = watch::channel(None);
        let handle = Self {
            user_id: user_id.into(),
            connection_id: connection_id.into(),
            outbox: tx,
            close: Arc::new(close_tx),
            order: Arc::new(Mutex::new(Order::starting())),
            max_held: queue_len.saturating_mul(4).max(64),
        };
        (
            handle,
            SessionEnds {
                outbox: rx,
                close: close_rx,
            },
        )
    }

    /// Queues a frame without waiting. A full queue means the device cannot keep up: typing is
    /// dropped (counted); anything else closes the connection so the client reconnects, rather
    /// than losing it silently or slowing the sender. Returns whether the frame was queued.
    pub fn push(&self, frame: Utf8Bytes, kind: FrameKind, metrics: &Metrics) -> bool {
        match self.outbox.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if kind == FrameKind::Typing {
                    metrics.typing_dropped();
                } else {
                    metrics.slow_consumers_closed.inc();
                    tracing::warn!(
                        user = %self.user_id,
                        connection = %self.connection_id,
                        "closing slow consumer: outgoing queue full"
                    );
                    self.request_close(
                        CLOSE_SLOW_CONSUMER,
                        "slow consumer: outgoing queue full; reconnect",
                    );
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Most frames that may wait for a gap.
    pub fn max_held(&self) -> usize {
        self.max_held
    }

    /// Whether the session is closing or gone: nothing sent to it arrives.
    pub fn is_closing(&self) -> bool {
        self.close.borrow().is_some() || self.outbox.is_closed()
    }

    /// Queues a reply if there is room now; gives it back when the queue is full.
    pub fn try_reply(&self, frame: Utf8Bytes) -> Result<(), Utf8Bytes> {
        match self.outbox.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Full(frame)) => Err(frame),
        }
    }

    /// This device's place in the inbox, locked. Never held across an await.
    pub fn order(&self) -> MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a frame that has place `seq` in this user's inbox: queued now if it is the
    /// next one, dropped if the device had it, held if frames before it are missing.
    pub fn offer(&self, seq: u64, frame: Utf8Bytes, kind: FrameKind, metrics: &Metrics) -> Offered {
        let mut order = self.order();
        let held = Held {
            frame,
            kind,
            ack: false,
        };
        match order.offer(seq, held.clone(), self.max_held) {
            // Queued under the lock, so that frames leave in the order they were decided.
            Decision::Send => match self.outbox.try_send(held.frame) {
                Ok(()) => Offered::Accepted,
                Err(mpsc::error::TrySendError::Closed(_)) => Offered::Dropped,
                // A burst (a batch of messages for this device) filled the queue: everything
                // after this frame is held while it waits for room, so order holds. A device
                // that does not read is closed once the wait runs out or too much is held.
                Err(mpsc::error::TrySendError::Full(frame)) => {
                    order.begin_catch_up(false);
                    Offered::Waits(frame)
                }
            },
            Decision::Duplicate => Offered::Dropped,
            Decision::Held => Offered::Accepted,
            Decision::CatchUp => Offered::NeedsCatchUp,
            Decision::Overflow => {
                self.close_too_far_behind(metrics);
                Offered::Dropped
            }
        }
    }

    /// Closes a device that has more frames waiting for a gap than it may hold; it
    /// reconnects with `?since=` and gets them from the store.
    pub fn close_too_far_behind(&self, metrics: &Metrics) {
        metrics.slow_consumers_closed.inc();
        self.request_close(
            CLOSE_SLOW_CONSUMER,
            "too far behind: reconnect with ?since=<last seq> to get the rest",
        );
    }

    /// Queues a reply to this connection's own frame (its ack, error or pong), or a frame
    /// of a replay. Unlike
    /// [`push`](Self::push) this waits for room: a client that sends faster than it reads its
    /// answers is slowed down (its frames are read later), not cut off, unless the queue stays
    /// full for `patience`.
    pub async fn reply(&self, frame: Utf8Bytes, patience: std::time::Duration, metrics: &Metrics) {
        match tokio::time::timeout(patience, self.outbox.send(frame)).await {
            Ok(_) => {}
            Err(_) => {
                metrics.slow_consumers_closed.inc();
                self.request_close(
                    CLOSE_SLOW_CONSUMER,
                    "slow consumer: replies not read; reconnect",
                );
            }
        }
    }

    /// Asks the session to close with this code; later requests do not override the first.
    pub fn request_close(&self, code: u16, reason: &str) {
        self.closer().request_close(code, reason);
    }

    /// What can close the session without holding its queue open (the writer keeps this).
    pub fn closer(&self) -> Closer {
        Closer(self.close.clone())
    }
}

/// Where [`Registry::deliver`] put a frame.
#[derive(Default)]
pub struct Delivered {
    pub devices: usize,
    /// Devices that hold it behind a gap; the store must fill the gap.
    pub catch_up: Vec<SessionHandle>,
    /// Devices whose queue is full: the frame waits for room, then what they hold is sent.
    pub waits: Vec<(SessionHandle, Utf8Bytes)>,
}

/// Local sessions by user. Sharded, so delivery to different users does not contend.
#[derive(Default)]
pub struct Registry {
    by_user: DashMap<Arc<str>, Vec<SessionHandle>, foldhash::fast::RandomState>,
    sessions: AtomicUsize,
    /// Devices let in per user, from the handshake on (before the session exists).
    pub admissions: Admissions,
}

/// Devices of each user this node has let in (upgrading or connected). The per-user cap is
/// checked and taken in one step, so two connects at once cannot both pass it on one node.
#[derive(Default, Clone)]
pub struct Admissions(Arc<DashMap<String, usize>>);

/// One device's place under its user's cap; given back when dropped (the session ended or
/// the upgrade failed).
pub struct Admission {
    admissions: Admissions,
    user_id: String,
}

impl Admissions {
    /// Takes a place for a device of `user_id` when `elsewhere` (its devices on other
    /// nodes) and those let in here stay under `max`; else `Err(devices)`.
    pub fn admit(&self, user_id: &str, elsewhere: usize, max: usize) -> Result<Admission, usize> {
        let mut here = self.0.entry(user_id.to_string()).or_default();
        let devices = elsewhere + *here;
        if devices >= max {
            drop(here);
            self.0.remove_if(user_id, |_, n| *n == 0);
            return Err(devices);
        }
        *here += 1;
        Ok(Admission {
            admissions: self.clone(),
            user_id: user_id.to_string(),
        })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let map = &self.admissions.0;
        if let Some(mut n) = map.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
        }
        map.remove_if(&self.user_id, |_, n| *n == 0);
    }
}

impl Registry {
    pub fn add(&self, handle: SessionHandle) {
        self.by_user
            .entry(handle.user_id.clone())
            .or_default()
            .push(handle);
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn remove(&self, handle: &SessionHandle) {
        let mut removed = false;
        self.by_user.remove_if_mut(&handle.user_id, |_, handles| {
            let before = handles.len();
            handles.retain(|h| h.connection_id != handle.connection_id);
            removed = handles.len() < before;
            handles.is_empty()
        });
        if removed {
            self.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queues `frame()` (made only when a device takes it) to every local device of
    /// `user_id` but `except`, in inbox order when it has a place there (`seq` > 0).
    /// Returns how many devices take it, and the devices that need a catch-up from the
    /// store first.
    pub fn deliver(
        &self,
        user_id: &str,
        frame: impl Fn() -> Utf8Bytes,
        kind: FrameKind,
        except: Option<&str>,
        seq: u64,
        metrics: &Metrics,
    ) -> Delivered {
        let mut delivered = Delivered::default();
        let Some(handles) = self.by_user.get(user_id) else {
            return delivered;
        };
        for h in handles.iter().filter(|h| except != Some(&*h.connection_id)) {
            if seq == 0 {
                delivered.devices += usize::from(h.push(frame(), kind, metrics));
                continue;
            }
            match h.offer(seq, frame(), kind, metrics) {
                Offered::Accepted => delivered.devices += 1,
                Offered::Dropped => {}
                Offered::NeedsCatchUp => {
                    delivered.devices += 1;
                    delivered.catch_up.push(h.clone());
                }
                Offered::Waits(frame) => {
                    delivered.devices += 1;
                    delivered.waits.push((h.clone(), frame));
                }
            }
        }
        delivered
    }

    /// Every local session (a snapshot).
    pub fn all(&self) -> Vec<SessionHandle> {
        self.by_user
            .iter()
            .flat_map(|e| e.value().clone())
            .collect()
    }

    pub fn devices_of(&self, user_id: &str) -> usize {
        self.by_user.get(user_id).map(|h| h.len()).unwrap_or(0)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    pub fn user_count(&self) -> usize {
        self.by_user.len()
    }

    /// Asks every session to close (graceful shutdown).
    pub fn close_all(&self, code: u16, reason: &str) {
        for entry in self.by_user.iter() {
            for h in entry.value() {
                h.request_close(code, reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_drops_typing_and_closes_for_chat() {
        let metrics = Metrics::default();
        let registry = Registry::default();
        let (h, mut ends) = SessionHandle::new("u", "c1", 1);
        registry.add(h.clone());
        let frame = Utf8Bytes::from_static("{}");
        assert_eq!(
            registry
                .deliver("u", || frame.clone(), FrameKind::Chat, None, 0, &metrics)
                .devices,
            1
        );
        assert_eq!(
            registry
                .deliver("u", || frame.clone(), FrameKind::Typing, None, 0, &metrics)
                .devices,
            0
        );
        assert_eq!(metrics.snapshot()["typingDropped"], 1);
        assert!(ends.close.borrow().is_none());
        assert_eq!(
            registry
                .deliver("u", || frame.clone(), FrameKind::Chat, None, 0, &metrics)
                .devices,
            0
        );
        assert_eq!(
            ends.close.borrow().as_ref().map(|r| r.code),
            Some(CLOSE_SLOW_CONSUMER)
        );
        assert!(ends.outbox.try_recv().is_ok());
    }

    #[test]
    fn except_skips_the_sending_device() {
        let metrics = Metrics::default();
        let registry = Registry::default();
        let (h1, _e1) = SessionHandle::new("u", "c1", 4);
        let (h2, _e2) = SessionHandle::new("u", "c2", 4);
        registry.add(h1.clone());
        registry.add(h2);
        let frame = Utf8Bytes::from_static("{}");
        assert_eq!(
            registry
                .deliver(
                    "u",
                    || frame.clone(),
                    FrameKind::Chat,
                    Some("c1"),
                    0,
                    &metrics
                )
                .devices,
            1
        );
        assert_eq!((registry.session_count(), registry.user_count()), (2, 1));
        registry.remove(&h1);
        registry.remove(&h1);
        assert_eq!(registry.session_count(), 1);
    }
}
