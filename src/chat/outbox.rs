//! A connection's outbox: the bounded queue of frames from every task that sends to a device
//! to the device's socket writer. The same contract as tokio's bounded `mpsc` (and its error
//! types), built on a `VecDeque` that allocates nothing until the first frame: tokio's channel
//! allocates a block of 32 slots when it is made, about 1 KiB of every idle connection's 9.
//! Senders are many (the batch tasks, the consumer of the broker, the session's own reader),
//! the reader is one (the session's writer).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};
use tokio::sync::Notify;

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    /// Wakes the reader: a frame was queued, or the last sender went.
    readable: Notify,
    /// Wakes senders waiting for room: a frame was taken, or the reader went.
    room: Notify,
    capacity: usize,
}

struct Queue<T> {
    frames: VecDeque<T>,
    senders: usize,
    reader_gone: bool,
}

impl<T> Shared<T> {
    fn queue(&self) -> MutexGuard<'_, Queue<T>> {
        // Nothing panics while the lock is held (a push or a pop); a poisoned lock still
        // holds a consistent queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending end; cheap to clone.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving end, the socket writer's.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A queue of at most `capacity` frames.
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    assert!(capacity > 0, "an outbox holds at least one frame");
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            frames: VecDeque::new(),
            senders: 1,
            reader_gone: false,
        }),
        readable: Notify::new(),
        room: Notify::new(),
        capacity,
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queues `frame` if there is room now.
    pub fn try_send(&self, frame: T) -> Result<(), TrySendError<T>> {
        let mut q = self.0.queue();
        if q.reader_gone {
            return Err(TrySendError::Closed(frame));
        }
        if q.frames.len() >= self.0.capacity {
            return Err(TrySendError::Full(frame));
        }
        q.frames.push_back(frame);
        drop(q);
        // One reader: a permit stored while it is not waiting wakes its next wait.
        self.0.readable.notify_one();
        Ok(())
    }

    /// Queues `frame`, waiting for room. Cancel-safe: dropped before it returns, the frame
    /// was not queued.
    pub async fn send(&self, mut frame: T) -> Result<(), SendError<T>> {
        loop {
            let room = self.0.room.notified();
            tokio::pin!(room);
            // Registered before the look at the queue, so that a frame taken between the
            // look and the wait still wakes this sender.
            room.as_mut().enable();
            match self.try_send(frame) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(f)) => return Err(SendError(f)),
                Err(TrySendError::Full(f)) => frame = f,
            }
            room.await;
        }
    }

    /// Whether the reader is gone: nothing sent arrives.
    pub fn is_closed(&self) -> bool {
        self.0.queue().reader_gone
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.queue().senders += 1;
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut q = self.0.queue();
            q.senders -= 1;
            q.senders == 0
        };
        if last {
            self.0.readable.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next frame; `None` once every sender is gone and the queue is empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(frame) => return Some(frame),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.0.readable.notified().await,
            }
        }
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut q = self.0.queue();
        match q.frames.pop_front() {
            Some(frame) => {
                drop(q);
                self.0.room.notify_one();
                Ok(frame)
            }
            None if q.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let frames = {
            let mut q = self.0.queue();
            q.reader_gone = true;
            std::mem::take(&mut q.frames)
        };
        // Dropped outside the lock; every waiting sender learns the queue is closed.
        drop(frames);
        self.0.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn frames_leave_in_order_and_a_full_queue_gives_the_frame_back() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.clone().try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(rx.try_recv(), Ok(1));
        tx.try_send(3).unwrap();
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn the_reader_gone_closes_the_queue_for_senders() {
        let (tx, rx) = channel(4);
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert!(matches!(tx.try_send(1), Err(TrySendError::Closed(1))));
    }

    #[tokio::test]
    async fn the_reader_gets_what_was_queued_then_none_once_every_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        let other = tx.clone();
        tx.try_send("a").unwrap();
        drop(tx);
        other.try_send("b").unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = rx.recv().await {
                got.push(f);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        other.try_send("c").unwrap();
        drop(other);
        assert_eq!(reader.await.unwrap(), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_learns_when_the_reader_goes() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(2).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the queue is full: the send waits");
        assert_eq!(rx.recv().await, Some(1));
        assert!(waiting.await.unwrap(), "a frame taken makes room");
        assert_eq!(rx.recv().await, Some(2));

        tx.try_send(3).unwrap();
        let stuck = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.send(4).await.is_ok() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        assert!(!stuck.await.unwrap(), "the reader went: the send fails");
    }

    #[tokio::test]
    async fn many_senders_and_a_small_queue_lose_and_repeat_nothing() {
        let (tx, mut rx) = channel(3);
        let mut tasks = Vec::new();
        for s in 0..8u32 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..500u32 {
                    tx.send(s * 1000 + n).await.unwrap();
                }
            }));
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(f) = rx.recv().await {
            got.push(f);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(got.len(), 4000);
        for s in 0..8u32 {
            let mine: Vec<u32> = got.iter().copied().filter(|f| f / 1000 == s).collect();
            assert_eq!(mine, (0..500).map(|n| s * 1000 + n).collect::<Vec<_>>());
        }
    }
}
