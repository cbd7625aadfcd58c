//! The broker: a narrow publish/subscribe trait and its in-memory implementation.
//!
//! A [`Message`] is built once by the publisher (parsed, validated,
//! serialized) and the same bytes are handed to every subscriber of its
//! topic. A distributed engine can implement [`Broker`] without touching
//! sessions or plugins.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::RwLock;

use crate::config::OnFull;
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
}

/// Identifies one subscription for `unsubscribe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// Publish/subscribe between publishers and sessions.
pub trait Broker: Send + Sync + 'static {
    /// Deliver `msg` to every subscriber of `topic`.
    fn publish(&self, topic: &Topic, msg: &Message);
    /// End a keyed stream: subscribers get what was published before, then Close 1000.
    fn end(&self, topic: &Topic);
    /// Add a subscriber; returns its id and the topic's subscriber count after adding.
    fn subscribe(&self, topic: &Topic, sub: Subscriber) -> (SubscriptionId, usize);
    /// Remove a subscriber; returns the topic's subscriber count after removing.
    fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) -> usize;
}

type SubList = Arc<RwLock<Vec<(SubscriptionId, Subscriber)>>>;

/// The single-process broker.
#[derive(Default)]
pub struct MemoryBroker {
    topics: RwLock<HashMap<Topic, SubList>>,
    next_id: AtomicU64,
}

impl MemoryBroker {
    /// An empty broker.
    pub fn new() -> MemoryBroker {
        MemoryBroker::default()
    }

    fn subs(&self, topic: &Topic) -> Option<SubList> {
        self.topics.read().get(topic).cloned()
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, topic: &Topic, msg: &Message) {
        let Some(subs) = self.subs(topic) else { return };
        let subs = subs.read();
        let Some((_, first)) = subs.first() else {
            return;
        };
        let metrics = &first.metrics;
        let (mut delivered, mut dropped, mut closed) = (0u64, 0u64, 0u64);
        for (_, s) in subs.iter() {
            match s.queue.push(msg.frame.clone(), s.on_full) {
                Pushed::Queued => delivered += 1,
                Pushed::DroppedOldest => {
                    delivered += 1;
                    dropped += 1;
                }
                Pushed::Closed => closed += 1,
                Pushed::Ignored => {}
            }
        }
        // One atomic add per message, not per subscriber.
        metrics.deliveries.fetch_add(delivered, Relaxed);
        if dropped > 0 {
            metrics.slow_drops.fetch_add(dropped, Relaxed);
        }
        if closed > 0 {
            metrics.slow_closes.fetch_add(closed, Relaxed);
        }
    }

    fn end(&self, topic: &Topic) {
        let Some(subs) = self.subs(topic) else { return };
        for (_, s) in subs.read().iter() {
            s.queue.close(crate::ws::close::NORMAL, "stream ended");
        }
    }

    fn subscribe(&self, topic: &Topic, sub: Subscriber) -> (SubscriptionId, usize) {
        let id = SubscriptionId(self.next_id.fetch_add(1, Relaxed));
        let mut topics = self.topics.write();
        let subs = topics.entry(topic.clone()).or_default();
        let mut g = subs.write();
        g.push((id, sub));
        (id, g.len())
    }

    fn unsubscribe(&self, topic: &Topic, id: SubscriptionId) -> usize {
        let mut topics = self.topics.write();
        let Some(subs) = topics.get(topic) else {
            return 0;
        };
        let mut g = subs.write();
        g.retain(|(i, _)| *i != id);
        let n = g.len();
        drop(g);
        if n == 0 {
            topics.remove(topic);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Outbound;

    #[test]
    fn every_subscriber_gets_the_same_bytes_and_counts_are_kept() {
        let b = MemoryBroker::new();
        let m = Arc::new(ChannelMetrics::default());
        let topic = Topic {
            channel: "c".into(),
            key: None,
        };
        let qs: Vec<_> = (0..3).map(|_| Arc::new(SessionQueue::new(4))).collect();
        let mut ids = Vec::new();
        for (i, q) in qs.iter().enumerate() {
            let (id, n) = b.subscribe(
                &topic,
                Subscriber {
                    queue: q.clone(),
                    on_full: OnFull::DropOldest,
                    metrics: m.clone(),
                },
            );
            assert_eq!(n, i + 1);
            ids.push(id);
        }
        let msg = Message {
            frame: crate::ws::frame(crate::ws::OP_TEXT, b"{\"a\":1}"),
        };
        b.publish(&topic, &msg);
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
        b.publish(&topic, &msg);
        assert_eq!(m.deliveries.load(Relaxed), 3);
    }
}
