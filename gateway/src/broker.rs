//! The broker: a narrow publish/subscribe trait and its in-memory implementation.
//!
//! A [`Message`] is built once by the publisher (parsed, validated,
//! serialized) and the same bytes are handed to every subscriber of its
//! topic. A distributed engine can implement [`Broker`] without touching
//! sessions or plugins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::RwLock;

use crate::config::OnFull;
use crate::filter::{SubFilter, Verdict};
use crate::metrics::ChannelMetrics;
use crate::queue::{Pushed, SessionQueue};

/// A channel, or one keyed stream of a channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Topic {
    /// Channel name.
    pub channel: Arc<str>,
    /// Stream key (keyed channels only).
    pub key: Option<Arc<str>>,
}

/// A published message: its frame is shared by every subscriber.
#[derive(Clone, Debug)]
pub struct Message {
    /// The complete WebSocket text frame (header and JSON), written as is to
    /// every subscriber's socket.
    pub frame: Bytes,
    /// Where the JSON starts in `frame`.
    pub payload: usize,
    /// The parsed message, kept when some subscriber may filter on it.
    pub value: Option<Arc<serde_json::Value>>,
    /// When it entered the gateway ([`crate::metrics::stamp`]; 0: not
    /// timed). Sessions time their writes from it.
    pub emitted: u32,
}

impl Message {
    /// A message from a frame whose JSON starts at `payload`.
    pub fn new(frame: Bytes, payload: usize) -> Message {
        Message {
            frame,
            payload,
            value: None,
            emitted: 0,
        }
    }

    /// This message, entered into the gateway at `stamp`
    /// ([`crate::metrics::stamp`]).
    pub fn emitted_at(mut self, stamp: u32) -> Message {
        self.emitted = stamp;
        self
    }

    /// The JSON text.
    pub fn json(&self) -> &[u8] {
        &self.frame[self.payload..]
    }
}

/// A subscriber: a session's queue and the channel's slow-consumer policy.
#[derive(Clone)]
pub struct Subscriber {
    /// Where frames go.
    pub queue: Arc<SessionQueue>,
    /// What to do when the queue is full.
    pub on_full: OnFull,
    /// Where drops and deliveries are counted.
    pub metrics: Arc<ChannelMetrics>,
    /// The subscription's filters, if it set any.
    pub filter: Option<Arc<SubFilter>>,
    /// Set when the subscription ends (stops held conflated frames).
    pub cancelled: Arc<AtomicBool>,
    /// Messages the topic had published when this subscriber joined (set
    /// by the broker): a subscriber that joined after a keyed stream's last
    /// message got nothing of it, and [`Broker::end`] keeps it.
    pub joined_at: u64,
    /// Which opening of a keyed stream it follows (kept by the channel).
    pub generation: Arc<AtomicU64>,
}

impl Subscriber {
    /// Hand `msg` to this subscriber, through its filters; `stamp` times
    /// its write (0 for a replay, whose wait is not the gateway's).
    fn deliver(&self, msg: &Message, stamp: u32) -> Pushed {
        let frame = match (&self.filter, &msg.value) {
            (Some(f), Some(v)) => {
                match f.decide(
                    v,
                    &msg.frame,
                    &self.queue,
                    self.on_full,
                    &self.cancelled,
                    &self.metrics,
                ) {
                    Verdict::Skip | Verdict::Held => return Pushed::Ignored,
                    Verdict::Shared => msg.frame.clone(),
                    Verdict::Own(b) => b,
                }
            }
            _ => msg.frame.clone(),
        };
        self.queue.push_timed(frame, stamp, self.on_full)
    }

    /// Hand `msgs` to this subscriber in order: without filters, under one
    /// lock of its queue and with one wake-up.
    fn deliver_all(&self, msgs: &[Message], mut each: impl FnMut(Pushed)) {
        if self.filter.is_some() || msgs.len() == 1 {
            msgs.iter().for_each(|m| each(self.deliver(m, m.emitted)));
        } else {
            self.queue.push_all(
                msgs.iter().map(|m| (m.frame.clone(), m.emitted)),
                self.on_full,
                each,
            );
        }
    }
}

/// Identifies one subscription for `unsubscribe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// Publish/subscribe between publishers and sessions.
pub trait Broker: Send + Sync + 'static {
    /// Deliver `msg` to every subscriber of `topic`; with `retain`, keep it
    /// as the topic's latest message.
    fn publish(&self, topic: &Topic, msg: &Message, retain: bool);
    /// [`Broker::publish`] for several messages of one topic, in order: each
    /// subscriber gets them back to back (one wake-up, one socket write).
    fn publish_batch(&self, topic: &Topic, msgs: &[Message], retain: bool) {
        for m in msgs {
            self.publish(topic, m, retain);
        }
    }
    /// The topic's latest retained message.
    fn last(&self, topic: &Topic) -> Option<Message>;
    /// End a keyed stream: subscribers get what was published before, then
    /// Close 1000. Subscribers that joined after its last message (they got
    /// nothing of it) stay subscribed, for the stream to be opened again;
    /// returns those kept.
    fn end(&self, topic: &Topic) -> Vec<Subscriber>;
    /// [`Broker::end`] for this instance's subscribers only: another
    /// instance ended the stream and told the others.
    fn end_here(&self, topic: &Topic) -> Vec<Subscriber> {
        self.end(topic)
    }
    /// Add a subscriber; returns its id and the topic's subscriber count
    /// after adding. With `replay`, the retained message (if any) is
    /// delivered to it first, atomically with respect to publishes.
    fn subscribe(&self, topic: &Topic, sub: Subscriber, replay: bool) -> (SubscriptionId, usize);
    /// Remove a subscriber; returns the topic's subscriber count after removing.
    fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) -> usize;
    /// Close every subscriber of every topic of `channel` (after what was
    /// published before) with `code`, and forget the channel's retained
    /// messages; returns how many subscribers were closed.
    fn close_channel(&self, channel: &str, code: u16, reason: &'static str) -> usize;
}

#[derive(Default)]
struct TopicState {
    subs: RwLock<Vec<(SubscriptionId, Subscriber)>>,
    last: parking_lot::Mutex<Option<Message>>,
    /// Messages published (counted under the `subs` read lock).
    published: AtomicU64,
}

/// The single-process broker.
#[derive(Default)]
pub struct MemoryBroker {
    topics: RwLock<HashMap<Topic, Arc<TopicState>>>,
    next_id: AtomicU64,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    fn state(&self, topic: &Topic) -> Option<Arc<TopicState>> {
        self.topics.read().get(topic).cloned()
    }

    /// Whether some subscriber follows `topic` here (or it keeps a message).
    pub fn follows(&self, topic: &Topic) -> bool {
        self.topics.read().contains_key(topic)
    }

    /// Give subscriber `id` the topic's last value `msg` fetched from
    /// elsewhere, if nothing was published to the topic since it joined;
    /// the topic keeps `msg` unless it has a newer one. Returns whether it
    /// was delivered.
    pub fn replay_if_fresh(&self, topic: &Topic, id: SubscriptionId, msg: &Message) -> bool {
        let Some(st) = self.state(topic) else {
            return false;
        };
        let mut subs = st.subs.write();
        let published = st.published.load(Relaxed);
        let Some((_, s)) = subs.iter_mut().find(|(i, _)| *i == id) else {
            return false;
        };
        if s.joined_at != published {
            return false;
        }
        s.deliver(msg, 0);
        s.joined_at = s.joined_at.saturating_sub(1);
        st.last.lock().get_or_insert_with(|| msg.clone());
        true
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, topic: &Topic, msg: &Message, retain: bool) {
        self.publish_batch(topic, std::slice::from_ref(msg), retain)
    }

    fn publish_batch(&self, topic: &Topic, msgs: &[Message], retain: bool) {
        let Some(newest) = msgs.last() else {
            return;
        };
        let st = match self.state(topic) {
            Some(s) => s,
            // A channel's last value is kept for whoever comes next; a keyed
            // stream only while someone follows it (its messages published
            // after the last one left would be kept for good, and replayed
            // stale to the next client of that key).
            None if retain && topic.key.is_none() => self
                .topics
                .write()
                .entry(topic.clone())
                .or_default()
                .clone(),
            None => return,
        };
        let subs = st.subs.read();
        st.published.fetch_add(msgs.len() as u64, Relaxed);
        if retain {
            *st.last.lock() = Some(newest.clone());
        }
        let Some((_, first)) = subs.first() else {
            return;
        };
        let metrics = &first.metrics;
        let (mut delivered, mut dropped, mut closed) = (0u64, 0u64, 0u64);
        for (_, s) in subs.iter() {
            s.deliver_all(msgs, |p| match p {
                Pushed::Queued => delivered += 1,
                Pushed::DroppedOldest => {
                    delivered += 1;
                    dropped += 1;
                }
                Pushed::Closed => closed += 1,
                Pushed::Ignored => {}
            });
        }
        // One atomic add per batch, not per subscriber.
        metrics.deliveries.fetch_add(delivered, Relaxed);
        if dropped > 0 {
            metrics.slow_drops.fetch_add(dropped, Relaxed);
        }
        if closed > 0 {
            metrics.slow_closes.fetch_add(closed, Relaxed);
        }
    }

    fn last(&self, topic: &Topic) -> Option<Message> {
        self.state(topic).and_then(|s| s.last.lock().clone())
    }

    fn end(&self, topic: &Topic) -> Vec<Subscriber> {
        let Some(st) = self.state(topic) else {
            return Vec::new();
        };
        *st.last.lock() = None;
        let mut subs = st.subs.write();
        let published = st.published.load(Relaxed);
        let mut kept = Vec::new();
        subs.retain(|(_, s)| {
            if s.joined_at >= published {
                kept.push(s.clone());
                return true;
            }
            s.queue.close(crate::ws::close::NORMAL, "stream ended");
            false
        });
        let empty = subs.is_empty();
        drop(subs);
        if empty {
            let mut topics = self.topics.write();
            if topics.get(topic).is_some_and(|s| s.subs.read().is_empty()) {
                topics.remove(topic);
            }
        }
        kept
    }

    fn subscribe(
        &self,
        topic: &Topic,
        mut sub: Subscriber,
        replay: bool,
    ) -> (SubscriptionId, usize) {
        let id = SubscriptionId(self.next_id.fetch_add(1, Relaxed));
        let mut topics = self.topics.write();
        let st = topics.entry(topic.clone()).or_default();
        let mut g = st.subs.write();
        sub.joined_at = st.published.load(Relaxed);
        if replay && let Some(m) = st.last.lock().as_ref() {
            sub.deliver(m, 0);
            // It has the stream's latest message.
            sub.joined_at = sub.joined_at.saturating_sub(1);
        }
        g.push((id, sub));
        (id, g.len())
    }

    fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) -> usize {
        let mut topics = self.topics.write();
        let Some(st) = topics.get(topic) else {
            return 0;
        };
        let mut g = st.subs.write();
        g.retain(|(i, _)| *i != id);
        let n = g.len();
        drop(g);
        // Unkeyed topics keep their retained message; a keyed stream nobody
        // follows is forgotten.
        if n == 0 && (topic.key.is_some() || st.last.lock().is_none()) {
            topics.remove(topic);
        }
        n
    }

    fn close_channel(&self, channel: &str, code: u16, reason: &'static str) -> usize {
        let gone: Vec<Arc<TopicState>> = {
            let mut topics = self.topics.write();
            let keys: Vec<Topic> = topics
                .keys()
                .filter(|t| &*t.channel == channel)
                .cloned()
                .collect();
            keys.iter().filter_map(|k| topics.remove(k)).collect()
        };
        let mut n = 0;
        for st in gone {
            for (_, s) in st.subs.read().iter() {
                if s.queue.close(code, reason) {
                    n += 1;
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Outbound;

    /// A broker, channel metrics and the unkeyed topic of channel `c`.
    fn unkeyed() -> (MemoryBroker, Arc<ChannelMetrics>, Topic) {
        let topic = Topic {
            channel: "c".into(),
            key: None,
        };
        (MemoryBroker::new(), Arc::default(), topic)
    }

    /// A plain subscriber (no filter, drop_oldest) on queue `q`.
    fn sub(q: &Arc<SessionQueue>, m: &Arc<ChannelMetrics>) -> Subscriber {
        Subscriber {
            queue: q.clone(),
            on_full: OnFull::DropOldest,
            metrics: m.clone(),
            filter: None,
            cancelled: Default::default(),
            joined_at: 0,
            generation: Default::default(),
        }
    }

    #[test]
    fn a_batch_reaches_every_subscriber_in_order_and_is_counted() {
        let (b, m, topic) = unkeyed();
        let qs: Vec<_> = (0..2).map(|_| Arc::new(SessionQueue::new(8))).collect();
        for q in &qs {
            b.subscribe(&topic, sub(q, &m), false);
        }
        let msgs: Vec<Message> = (1..=3u8)
            .map(|n| Message::new(Bytes::from(vec![b'0' + n]), 0))
            .collect();
        b.publish_batch(&topic, &msgs, true);
        for q in &qs {
            let mut out = Vec::new();
            q.take(&mut out, 10);
            let got: Vec<_> = out
                .iter()
                .map(|o| match o {
                    Outbound::Frame(f) => f.clone(),
                    Outbound::Close(..) => panic!("closed"),
                })
                .collect();
            assert_eq!(got, [&b"1"[..], b"2", b"3"]);
        }
        assert_eq!(m.deliveries.load(Relaxed), 6);
        assert_eq!(
            b.last(&topic).map(|l| l.frame),
            Some(Bytes::from_static(b"3"))
        );
    }

    #[test]
    fn every_subscriber_gets_the_same_bytes_and_counts_are_kept() {
        let (b, m, topic) = unkeyed();
        let qs: Vec<_> = (0..3).map(|_| Arc::new(SessionQueue::new(4))).collect();
        let mut ids = Vec::new();
        for (i, q) in qs.iter().enumerate() {
            let (id, n) = b.subscribe(&topic, sub(q, &m), false);
            assert_eq!(n, i + 1);
            ids.push(id);
        }
        let msg = Message::new(crate::ws::frame(crate::ws::OP_TEXT, b"{\"a\":1}"), 2);
        b.publish(&topic, &msg, false);
        assert_eq!(m.deliveries.load(Relaxed), 3);
        for q in &qs {
            let mut out = Vec::new();
            q.take(&mut out, 10);
            match &out[..] {
                [Outbound::Frame(f)] => {
                    // Same allocation, not a copy.
                    assert_eq!(f.as_ptr(), msg.frame.as_ptr());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(b.unsubscribe(&topic, ids[0]), 2);
        assert_eq!(b.unsubscribe(&topic, ids[1]), 1);
        assert_eq!(b.unsubscribe(&topic, ids[2]), 0);
        b.publish(&topic, &msg, false);
        assert_eq!(m.deliveries.load(Relaxed), 3);
    }

    #[test]
    fn a_keyed_stream_nobody_follows_is_not_kept() {
        let (b, m, _) = unkeyed();
        let keyed = Topic {
            channel: "c".into(),
            key: Some("job-1".into()),
        };
        let q = Arc::new(SessionQueue::new(4));
        let (id, _) = b.subscribe(&keyed, sub(&q, &m), false);
        assert_eq!(b.unsubscribe(&keyed, id), 0);
        // The poll its subscribe asked for comes after the client left.
        let msg = Message::new(Bytes::from_static(b"late"), 0);
        b.publish(&keyed, &msg, true);
        assert!(b.topics.read().is_empty(), "the keyed topic was made again");
        assert!(b.last(&keyed).is_none());
        // A channel's own last value is still kept without subscribers.
        let (_, _, unkeyed_topic) = unkeyed();
        b.publish(&unkeyed_topic, &msg, true);
        assert_eq!(b.last(&unkeyed_topic).map(|l| l.frame), Some(msg.frame));
    }

    #[test]
    fn ending_a_stream_keeps_only_subscribers_that_got_nothing_of_it() {
        let b = MemoryBroker::new();
        let m = Arc::new(ChannelMetrics::default());
        let topic = Topic {
            channel: "jobs".into(),
            key: Some("j1".into()),
        };
        let (early, late) = (
            Arc::new(SessionQueue::new(4)),
            Arc::new(SessionQueue::new(4)),
        );
        b.subscribe(&topic, sub(&early, &m), false);
        let msg = Message::new(crate::ws::frame(crate::ws::OP_TEXT, b"{}"), 2);
        b.publish(&topic, &msg, false);
        // Joins after the stream's last message, before its end.
        b.subscribe(&topic, sub(&late, &m), false);
        let kept = b.end(&topic);
        assert_eq!(kept.len(), 1);
        assert!(Arc::ptr_eq(&kept[0].queue, &late));
        assert!(early.is_closing() && !late.is_closing());
        // The kept subscriber gets the stream opened again.
        b.publish(&topic, &msg, false);
        let mut out = Vec::new();
        late.take(&mut out, 10);
        assert_eq!(out.len(), 1);
        // Nobody kept: the topic is forgotten.
        assert!(b.end(&topic).is_empty());
        assert!(b.topics.read().is_empty());
    }

    #[test]
    fn retained_messages_replay_to_new_subscribers_only_when_asked() {
        let (b, m, topic) = unkeyed();
        let msg = Message::new(crate::ws::frame(crate::ws::OP_TEXT, b"{}"), 2);
        b.publish(&topic, &msg, true);
        assert_eq!(b.last(&topic).map(|m| m.frame), Some(msg.frame.clone()));
        let (q1, q2) = (
            Arc::new(SessionQueue::new(4)),
            Arc::new(SessionQueue::new(4)),
        );
        let (id1, _) = b.subscribe(&topic, sub(&q1, &m), true);
        b.subscribe(&topic, sub(&q2, &m), false);
        let (mut o1, mut o2) = (Vec::new(), Vec::new());
        q1.take(&mut o1, 10);
        q2.take(&mut o2, 10);
        assert_eq!((o1.len(), o2.len()), (1, 0));
        // The retained message outlives its subscribers on an unkeyed topic.
        b.unsubscribe(&topic, id1);
        assert!(b.last(&topic).is_some());
    }
}
