//! Messages per second through the plugin ABI push path into the publisher:
//! the real `ticker` plugin (loaded from its .so) emits as fast as it can, and
//! every message is copied at the boundary, framed, parsed, validated and
//! published (to no subscriber). Runs alternate between the bench schema and
//! an empty schema, five of each, to show what validation costs end to end.
//! `cargo bench -p gateway --bench push_path`

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use gateway::Gateway;
use gateway::config::{self, LoadOptions};

const MESSAGES: u64 = 3_000_000;
const ROUNDS: usize = 5;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "-q", "-p", "ticker"])
        .status()
        .expect("cargo build");
    assert!(status.success());
    let plugins = root.join("target/release");
    let bench_schema =
        std::fs::read_to_string(root.join("examples/bench/bench.schema.json")).unwrap();
    // The two runs alternate, ROUNDS times: the push path is a pipeline of
    // the plugin's thread and the publisher on a shared machine, so one run
    // of each says little. The medians are compared.
    let schemas = [
        ("bench schema", bench_schema.as_str()),
        ("empty schema {}", "{}"),
    ];
    let mut rates = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        for (i, (label, schema)) in schemas.iter().enumerate() {
            let r = run(&plugins, schema);
            println!("round {round}, {label}: {MESSAGES} messages of ~150 B at {r:.2} M msg/s");
            rates[i].push(r);
        }
    }
    let [with, without] = rates.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r
    });
    for ((label, _), r) in schemas.iter().zip([&with, &without]) {
        println!(
            "push path, {label}: median {:.2} M msg/s (runs {:.2}-{:.2})",
            r[ROUNDS / 2],
            r[0],
            r[ROUNDS - 1]
        );
    }
    println!(
        "validation costs {:.1}% of push-path throughput (median with the bench schema vs median with an empty schema)",
        (1.0 - with[ROUNDS / 2] / without[ROUNDS / 2]) * 100.0
    );
}

/// Millions of messages per second through one channel validated with `schema`.
fn run(plugins: &Path, schema: &str) -> f64 {
    let dir = temp_dir();
    std::fs::write(dir.join("bench.schema.json"), schema).unwrap();
    std::fs::write(
        dir.join("gateway.yaml"),
        format!(
            "listeners: {{main: {{bind: \"127.0.0.1:0\"}}}}\nplugins: {{dirs: [{}]}}\nchannels: [push.yaml]\nlog: {{level: warn}}\n",
            plugins.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("push.yaml"),
        format!(
            "channel: push\nschema: bench.schema.json\nsource:\n  plugin: ticker\n  mode: push\n  config: {{rate: 100000000, pad: 100, limit: {MESSAGES}}}\nendpoints: [{{path: /push}}]\n"
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rate = rt.block_on(async {
        let cfg = config::load(&dir.join("gateway.yaml"), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let gw = Gateway::start(cfg).await.unwrap_or_else(|e| panic!("{e}"));
        let m = gw
            .state()
            .live()
            .channels
            .get("push")
            .unwrap()
            .metrics
            .clone();
        let start = Instant::now();
        // The ticker runs from the start of the gateway: what it published
        // before the clock started is not in the measured time.
        let before = m.published.load(Relaxed) + m.schema_failures.load(Relaxed);
        while m.published.load(Relaxed) + m.schema_failures.load(Relaxed) < MESSAGES {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "too slow: {} published",
                m.published.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(
            m.published.load(Relaxed),
            MESSAGES,
            "every message valid and published"
        );
        gw.shutdown().await;
        (MESSAGES - before) as f64 / secs / 1e6
    });
    let _ = std::fs::remove_dir_all(&dir);
    rate
}

fn temp_dir() -> std::path::PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "gateway-push-bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
