//! The bounded per-session outbound queue.
//!
//! Publishers push shared frames (a refcount bump, never a copy); the
//! session's task takes up to `write_batch` frames at a time and writes them
//! with one flush. When the queue is full the pushing channel's policy
//! decides: drop the oldest frame, or close the session with 1008.

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::config::OnFull;

/// The ring capacity to keep once `taken` items drained a ring of
/// `capacity`: a ring sized for the batches it carries is kept (no regrowth
/// on every batch); one at least four times too big for the last batch
/// shrinks to twice that batch (at least 4), so a burst's memory goes back
/// once batches are small again.
pub fn keep_capacity(capacity: usize, taken: usize) -> Option<usize> {
    (capacity > 4 && taken.saturating_mul(4) <= capacity).then(|| (taken * 2).max(4))
}

/// One item for the socket writer.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// A complete frame (shared bytes).
    Frame(Bytes),
    /// Send a Close frame with this code and reason, then stop writing.
    Close(u16, &'static str),
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

/// A queued item and when its message entered the gateway
/// ([`crate::metrics::stamp`]; 0: not timed).
struct Item {
    out: Outbound,
    stamp: u32,
}

struct Inner {
    items: VecDeque<Item>,
    closing: bool,
    /// The session paces its writes ([`SessionQueue::paced`]); set once,
    /// kept here where it takes no room.
    paced: bool,
    /// The last take of a paced queue took something: the session comes
    /// back for more when its interval is up (or at once, if the take left
    /// frames behind), so pushes do not wake it meanwhile. A Close does.
    hold_wakes: bool,
}

/// What one take did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// The stamp of the first timed frame taken (the oldest), if any.
    pub oldest: Option<u32>,
    /// Data frames taken (a Close is not counted).
    pub frames: usize,
    /// Nothing was left in the queue after the take.
    pub drained: bool,
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
                paced: false,
                hold_wakes: false,
            }),
            notify: Notify::new(),
            cap: cap.max(1),
        }
    }

    /// A queue for a session that paces its writes (`write_interval`):
    /// after a take that took something, pushes do not wake the session (it
    /// takes again when its interval is up, or after its write if the take
    /// left frames behind); after one that took nothing, the next push does.
    /// A Close always wakes it.
    pub fn paced(cap: usize) -> SessionQueue {
        let q = SessionQueue::new(cap);
        q.inner.lock().paced = true;
        q
    }

    /// Queue a data frame that is not timed (a reply, a filter's held
    /// frame), applying `on_full` when the queue is full.
    pub fn push(&self, frame: Bytes, on_full: OnFull) -> Pushed {
        self.push_timed(frame, 0, on_full)
    }

    /// Queue a data frame whose message entered the gateway at `stamp`
    /// ([`crate::metrics::stamp`]; 0: not timed).
    pub fn push_timed(&self, frame: Bytes, stamp: u32, on_full: OnFull) -> Pushed {
        let mut g = self.inner.lock();
        let wakes = g.items.is_empty() && !g.hold_wakes;
        let outcome = self.push_locked(&mut g, frame, stamp, on_full);
        drop(g);
        if (wakes && outcome != Pushed::Ignored) || outcome == Pushed::Closed {
            self.notify.notify_one();
        }
        outcome
    }

    /// Queue data frames (with their [`Self::push_timed`] stamps) in order
    /// under one lock, with one wake-up of the session; `each` sees what
    /// every push did.
    pub fn push_all(
        &self,
        frames: impl IntoIterator<Item = (Bytes, u32)>,
        on_full: OnFull,
        mut each: impl FnMut(Pushed),
    ) {
        let mut g = self.inner.lock();
        let wakes = g.items.is_empty() && !g.hold_wakes;
        let mut closed = false;
        for (frame, stamp) in frames {
            let outcome = self.push_locked(&mut g, frame, stamp, on_full);
            closed |= outcome == Pushed::Closed;
            each(outcome);
        }
        let queued = !g.items.is_empty();
        drop(g);
        if (wakes && queued) || closed {
            self.notify.notify_one();
        }
    }

    fn push_locked(&self, g: &mut Inner, frame: Bytes, stamp: u32, on_full: OnFull) -> Pushed {
        if g.closing {
            return Pushed::Ignored;
        }
        let item = Item {
            out: Outbound::Frame(frame),
            stamp,
        };
        if g.items.len() < self.cap {
            g.items.push_back(item);
            return Pushed::Queued;
        }
        match on_full {
            OnFull::DropOldest => {
                // A Close is never dropped; only data.
                if let Some(pos) = g
                    .items
                    .iter()
                    .position(|i| matches!(i.out, Outbound::Frame(_)))
                {
                    g.items.remove(pos);
                }
                g.items.push_back(item);
                Pushed::DroppedOldest
            }
            OnFull::Close => {
                g.items.clear();
                g.items.push_back(Item {
                    out: Outbound::Close(crate::ws::close::POLICY, "slow consumer: queue full"),
                    stamp: 0,
                });
                g.closing = true;
                Pushed::Closed
            }
        }
    }

    /// Close after the frames already queued; later pushes are ignored.
    /// Returns false if the queue was already closing.
    pub fn close(&self, code: u16, reason: &'static str) -> bool {
        let mut g = self.inner.lock();
        if g.closing {
            return false;
        }
        g.closing = true;
        g.items.push_back(Item {
            out: Outbound::Close(code, reason),
            stamp: 0,
        });
        drop(g);
        self.notify.notify_one();
        true
    }

    /// Hand up to `max` items to `each`, in order; stops early when `each`
    /// returns false (that item is consumed).
    pub fn take_each(&self, max: usize, mut each: impl FnMut(Outbound) -> bool) -> Taken {
        let mut g = self.inner.lock();
        let mut taken = 0;
        let mut t = Taken::default();
        while taken < max {
            let Some(item) = g.items.pop_front() else {
                break;
            };
            taken += 1;
            if t.oldest.is_none() && item.stamp != 0 {
                t.oldest = Some(item.stamp);
            }
            let frame = matches!(item.out, Outbound::Frame(_));
            t.frames += usize::from(frame);
            if !each(item.out) {
                break;
            }
        }
        g.hold_wakes = g.paced && taken > 0;
        t.drained = g.items.is_empty();
        if t.drained
            && let Some(keep) = keep_capacity(g.items.capacity(), taken)
        {
            // A burst grew the ring; give the memory back once it drains.
            g.items.shrink_to(keep);
        }
        t
    }

    /// Move up to `max` items into `out`.
    pub fn take(&self, out: &mut Vec<Outbound>, max: usize) {
        self.take_each(max, |item| {
            out.push(item);
            true
        });
    }

    /// Give the ring's memory back if nothing is queued.
    pub fn release(&self) {
        let mut g = self.inner.lock();
        if g.items.is_empty() {
            g.items = VecDeque::new();
        }
    }

    /// Whether a Close is queued (the session is ending).
    pub fn is_closing(&self) -> bool {
        self.inner.lock().closing
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

    fn t(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn texts(q: &SessionQueue) -> Vec<String> {
        let mut out = Vec::new();
        q.take(&mut out, 100);
        texts_of(out)
    }

    /// Whether the session would wake now (a stored wake-up is used up).
    fn woke(q: &SessionQueue) -> bool {
        use futures_util::FutureExt;
        q.notified().now_or_never().is_some()
    }

    #[test]
    fn a_paced_queue_wakes_its_session_only_when_it_has_no_write_time_to_come() {
        let q = SessionQueue::paced(3);
        let mut out = Vec::new();
        q.push(t("a"), OnFull::DropOldest);
        assert!(woke(&q), "the first push wakes an idle session");
        q.take(&mut out, 8);
        // The session took something: it comes back at its next write time.
        q.push(t("b"), OnFull::DropOldest);
        q.push_all([(t("c"), 0)], OnFull::DropOldest, |_| {});
        assert!(
            !woke(&q),
            "pushes after a take wait for the next write time"
        );
        q.take(&mut out, 8);
        assert!(!woke(&q));
        // Its next take finds nothing: from then on a push wakes it again.
        q.take(&mut out, 8);
        assert_eq!(texts_of(out), ["a", "b", "c"]);
        q.push(t("d"), OnFull::DropOldest);
        assert!(woke(&q), "after a take that found nothing, a push wakes");
        // A Close wakes it whenever it comes: a full queue closing it...
        q.take(&mut Vec::new(), 8);
        for s in ["e", "f", "g", "h"] {
            q.push(t(s), OnFull::Close);
        }
        assert!(woke(&q), "a slow-consumer close wakes a paced session");
        // ...or a close of its own.
        let q = SessionQueue::paced(3);
        q.push(t("a"), OnFull::DropOldest);
        q.take(&mut Vec::new(), 8);
        assert!(woke(&q), "the wake-up of the push of a, kept until now");
        assert!(q.close(1001, "going away"));
        assert!(woke(&q), "a close wakes a paced session");
        // Unpaced, every push onto an empty queue wakes.
        let q = SessionQueue::new(3);
        q.push(t("a"), OnFull::DropOldest);
        q.take(&mut Vec::new(), 8);
        assert!(woke(&q), "the wake-up of the push of a, kept until now");
        q.push(t("b"), OnFull::DropOldest);
        assert!(woke(&q), "unpaced, a push after a take wakes");
    }

    fn texts_of(out: Vec<Outbound>) -> Vec<String> {
        out.into_iter()
            .map(|o| match o {
                Outbound::Frame(t) => String::from_utf8(t.to_vec()).unwrap(),
                Outbound::Close(c, r) => format!("close {c} {r}"),
            })
            .collect()
    }

    #[test]
    fn a_drained_ring_is_kept_while_it_fits_its_batches_and_given_back_after_a_burst_or_when_quiet()
    {
        assert_eq!(keep_capacity(4, 0), None, "the smallest ring stays");
        assert_eq!(keep_capacity(64, 40), None, "sized for its batches");
        assert_eq!(keep_capacity(64, 16), Some(32));
        assert_eq!(keep_capacity(1024, 1), Some(4));
        let q = SessionQueue::new(1000);
        q.push_all((0..200).map(|_| (t("x"), 0)), OnFull::DropOldest, |_| {});
        let mut out = Vec::new();
        q.take(&mut out, 200);
        let burst = q.inner.lock().items.capacity();
        assert!(burst >= 200, "{burst}");
        q.push(t("y"), OnFull::DropOldest);
        q.take(&mut out, 200);
        assert_eq!(
            q.inner.lock().items.capacity(),
            4,
            "a small batch after a burst"
        );
        q.push_all((0..40).map(|_| (t("z"), 0)), OnFull::DropOldest, |_| {});
        q.take(&mut out, 200);
        assert!(
            q.inner.lock().items.capacity() >= 40,
            "kept for its batches"
        );
        q.release();
        assert_eq!(q.inner.lock().items.capacity(), 0, "given back while quiet");
    }

    #[test]
    fn push_all_applies_the_policy_to_each_frame_in_order() {
        let q = SessionQueue::new(2);
        let mut seen = Vec::new();
        q.push_all(
            [(t("1"), 0), (t("2"), 0), (t("3"), 0)],
            OnFull::DropOldest,
            |p| seen.push(p),
        );
        assert_eq!(
            seen,
            [Pushed::Queued, Pushed::Queued, Pushed::DroppedOldest]
        );
        assert_eq!(texts(&q), ["2", "3"]);
        seen.clear();
        q.push_all(
            [(t("4"), 0), (t("5"), 0), (t("6"), 0)],
            OnFull::Close,
            |p| seen.push(p),
        );
        assert_eq!(seen, [Pushed::Queued, Pushed::Queued, Pushed::Closed]);
    }

    #[test]
    fn a_take_reports_its_oldest_timed_frame_its_frames_and_whether_it_drained_the_queue() {
        let q = SessionQueue::new(3);
        let mut out = Vec::new();
        let mut take = |max| {
            q.take_each(max, |o| {
                out.push(o);
                true
            })
        };
        let took = |oldest, frames, drained| Taken {
            oldest,
            frames,
            drained,
        };
        assert_eq!(take(10), took(None, 0, true), "nothing queued");
        q.push(t("reply"), OnFull::DropOldest);
        q.push_timed(t("1"), 7, OnFull::DropOldest);
        q.push_timed(t("2"), 9, OnFull::DropOldest);
        assert_eq!(
            take(10),
            took(Some(7), 3, true),
            "the reply is not timed; the oldest frame is"
        );
        q.push_all(
            [(t("3"), 11), (t("4"), 12), (t("5"), 13), (t("6"), 14)],
            OnFull::DropOldest,
            |_| {},
        );
        assert_eq!(
            take(2),
            took(Some(12), 2, false),
            "frame 3 was dropped for frame 6"
        );
        assert_eq!(take(2), took(Some(14), 1, true), "what the last take left");
        q.push(t("reply"), OnFull::DropOldest);
        assert_eq!(take(10), took(None, 1, true), "only untimed frames");
        assert!(q.close(1000, "bye"));
        assert_eq!(
            take(10),
            took(None, 0, true),
            "a Close is neither timed nor a frame"
        );
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
        assert!(q.close(1001, "bye"));
        assert!(!q.close(1000, "again"));
        assert_eq!(q.push(t("2"), OnFull::DropOldest), Pushed::Ignored);
        assert_eq!(texts(&q), ["1", "close 1001 bye"]);
    }
}
