//! The bounded per-session outbound queue.
//!
//! Publishers push shared frames (a refcount bump, never a copy); the
//! session's task takes up to `write_batch` frames at a time and writes them
//! with one flush. When the queue is full the pushing channel's policy
//! decides: drop the oldest frame, or close the session with 1008.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::config::OnFull;

/// One item for the socket writer.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// A text frame (shared bytes).
    Text(Utf8Bytes),
    /// Send a Close frame and stop writing.
    Close(CloseCode, &'static str),
    /// Flush whatever tungstenite has queued (e.g. an automatic Pong).
    Flush,
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued after dropping the oldest frame.
    DroppedOldest,
    /// The queue was full and the policy closed the session.
    Closed,
    /// The session is closing; nothing was queued.
    Ignored,
}

struct Inner {
    items: VecDeque<Outbound>,
    closing: bool,
}

/// A session's outbound queue.
pub struct SessionQueue {
    inner: Mutex<Inner>,
    notify: Notify,
    cap: usize,
}

impl SessionQueue {
    /// A queue holding at most `cap` frames.
    pub fn new(cap: usize) -> SessionQueue {
        SessionQueue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                closing: false,
            }),
            notify: Notify::new(),
            cap: cap.max(1),
        }
    }

    /// Queue a data frame, applying `on_full` when the queue is full.
    pub fn push(&self, frame: Utf8Bytes, on_full: OnFull) -> Pushed {
        let mut g = self.inner.lock();
        if g.closing {
            return Pushed::Ignored;
        }
        let was_empty = g.items.is_empty();
        let outcome = if g.items.len() >= self.cap {
            match on_full {
                OnFull::DropOldest => {
                    // Control items (Close/Flush) are never dropped; only data.
                    if let Some(pos) = g.items.iter().position(|i| matches!(i, Outbound::Text(_))) {
                        g.items.remove(pos);
                    }
                    g.items.push_back(Outbound::Text(frame));
                    Pushed::DroppedOldest
                }
                OnFull::Close => {
                    g.items.clear();
                    g.items.push_back(Outbound::Close(
                        CloseCode::Policy,
                        "slow consumer: queue full",
                    ));
                    g.closing = true;
                    Pushed::Closed
                }
            }
        } else {
            g.items.push_back(Outbound::Text(frame));
            Pushed::Queued
        };
        drop(g);
        if was_empty || outcome == Pushed::Closed {
            self.notify.notify_one();
        }
        outcome
    }

    /// Queue a control item past the bound (replies, flushes).
    pub fn push_control(&self, item: Outbound) {
        let mut g = self.inner.lock();
        if g.closing {
            return;
        }
        g.items.push_back(item);
        drop(g);
        self.notify.notify_one();
    }

    /// Close after the frames already queued; later pushes are ignored.
    /// Returns false if the queue was already closing.
    pub fn close(&self, code: CloseCode, reason: &'static str) -> bool {
        let mut g = self.inner.lock();
        if g.closing {
            return false;
        }
        g.closing = true;
        g.items.push_back(Outbound::Close(code, reason));
        drop(g);
        self.notify.notify_one();
        true
    }

    /// Move up to `max` items into `out`.
    pub fn take(&self, out: &mut Vec<Outbound>, max: usize) {
        let mut g = self.inner.lock();
        let n = g.items.len().min(max);
        out.extend(g.items.drain(..n));
        if g.items.is_empty() && g.items.capacity() > 64 {
            // A burst grew the ring; give the memory back once it drains.
            g.items.shrink_to(16);
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().items.is_empty()
    }

    /// Wait until something may have been queued.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(s)
    }

    fn texts(q: &SessionQueue) -> Vec<String> {
        let mut out = Vec::new();
        q.take(&mut out, 100);
        out.into_iter()
            .map(|o| match o {
                Outbound::Text(t) => t.to_string(),
                Outbound::Close(c, r) => format!("close {} {r}", u16::from(c)),
                Outbound::Flush => "flush".into(),
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_frames() {
        let q = SessionQueue::new(2);
        assert_eq!(q.push(t("1"), OnFull::DropOldest), Pushed::Queued);
        assert_eq!(q.push(t("2"), OnFull::DropOldest), Pushed::Queued);
        assert_eq!(q.push(t("3"), OnFull::DropOldest), Pushed::DroppedOldest);
        assert_eq!(texts(&q), ["2", "3"]);
    }

    #[test]
    fn close_policy_replaces_the_backlog_with_1008() {
        let q = SessionQueue::new(1);
        q.push(t("1"), OnFull::Close);
        assert_eq!(q.push(t("2"), OnFull::Close), Pushed::Closed);
        assert_eq!(q.push(t("3"), OnFull::Close), Pushed::Ignored);
        assert_eq!(texts(&q), ["close 1008 slow consumer: queue full"]);
    }

    #[test]
    fn close_comes_after_queued_frames_and_stops_pushes() {
        let q = SessionQueue::new(8);
        q.push(t("1"), OnFull::DropOldest);
        assert!(q.close(CloseCode::Away, "bye"));
        assert!(!q.close(CloseCode::Normal, "again"));
        assert_eq!(q.push(t("2"), OnFull::DropOldest), Pushed::Ignored);
        assert_eq!(texts(&q), ["1", "close 1001 bye"]);
    }
}
