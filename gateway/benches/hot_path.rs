//! Microbenchmarks of the per-message hot path: the publisher's one parse and
//! one validation, and the fan-out of one frame to many subscriber queues.
//! Figures and how to read them: docs/performance.md.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::broker::{Broker, MemoryBroker, Subscriber, Topic};
use gateway::channel::check_message;
use gateway::config::{OnFull, compile_schema};
use gateway::metrics::ChannelMetrics;
use gateway::queue::SessionQueue;
use gateway::ws::text_frame;

/// The benchmark workload's message: ~150 bytes.
fn bench_message() -> Vec<u8> {
    format!(
        r#"{{"seq":123456,"ts":1795431470503442421,"pad":"{}"}}"#,
        "x".repeat(100)
    )
    .into_bytes()
}

fn publisher(c: &mut Criterion) {
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/bench/bench.schema.json");
    let validator = compile_schema(&schema).expect("bench schema");
    let permissive = jsonschema::validator_for(&serde_json::json!({})).unwrap();
    let json = bench_message();
    let mut g = c.benchmark_group("publisher");
    g.throughput(Throughput::Elements(1));
    g.bench_function("frame+parse+validate (bench schema)", |b| {
        b.iter(|| {
            let (frame, header) = text_frame(black_box(&json));
            black_box(check_message(&validator, frame, header).is_ok())
        })
    });
    g.bench_function("frame+parse (schema {})", |b| {
        b.iter(|| {
            let (frame, header) = text_frame(black_box(&json));
            black_box(check_message(&permissive, frame, header).is_ok())
        })
    });
    g.finish();
}

fn fan_out(c: &mut Criterion) {
    let (frame, header) = text_frame(&bench_message());
    let schema = jsonschema::validator_for(&serde_json::json!({})).unwrap();
    let msg = check_message(&schema, frame, header).unwrap();
    let mut g = c.benchmark_group("fan-out");
    for subs in [1usize, 100, 1000] {
        let broker = MemoryBroker::new();
        let metrics = Arc::new(ChannelMetrics::default());
        let topic = Topic {
            channel: "bench".into(),
            key: None,
        };
        let queues: Vec<Arc<SessionQueue>> = (0..subs)
            .map(|_| Arc::new(SessionQueue::new(1024)))
            .collect();
        for q in &queues {
            broker.subscribe(
                &topic,
                Subscriber {
                    queue: q.clone(),
                    on_full: OnFull::DropOldest,
                    metrics: metrics.clone(),
                    filter: None,
                    cancelled: Default::default(),
                    joined_at: 0,
                    generation: Default::default(),
                },
                false,
            );
        }
        let mut out = Vec::with_capacity(64);
        // One message (`publish` is a batch of one), and a batch of 10 (what
        // one read of a busy source brings): one lock and one wake-up per
        // subscriber for all 10.
        for (name, batch) in [
            ("publish+drain, deliveries", vec![msg.clone()]),
            (
                "publish_batch of 10+drain, deliveries",
                vec![msg.clone(); 10],
            ),
        ] {
            g.throughput(Throughput::Elements((subs * batch.len()) as u64));
            g.bench_with_input(BenchmarkId::new(name, subs), &subs, |b, _| {
                b.iter(|| {
                    broker.publish_batch(&topic, &batch, false);
                    // What each session does with it: take the frames off its queue.
                    for q in &queues {
                        q.take(&mut out, 64);
                        out.clear();
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, publisher, fan_out);
criterion_main!(benches);
