//! `loadgen`: measures a WebSocket fan-out server (delivery rate, latency,
//! sequence gaps) or holds idle connections; `loadgen publish` feeds NATS.
//! Prints exactly one JSON line on stdout; progress goes to stderr.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadgen::publish::{PublishConfig, publish};
use loadgen::{Config, Mode, run};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "WebSocket fan-out load generator: delivery rate, latency, sequence gaps",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Publish {"seq","ts","pad"} messages to NATS over plain TCP at a fixed rate.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Server URL (ws:// only). See --spread for its placeholder.
    #[arg(long, required = true)]
    url: Option<String>,
    /// Spread the clients over K URLs: client c connects to --url with its
    /// placeholder (the letter n in curly braces) replaced by c % K, e.g.
    /// /bench/0 ... /bench/9 with K = 10.
    // (clap's help output turns the placeholder itself into a line break.)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    spread: u32,
    /// Number of client connections.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// New connections per second while connecting (0 = no pacing).
    #[arg(long, default_value_t = 2000.0)]
    ramp: f64,
    /// Measurement window (stream/nats modes), e.g. 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Time after connecting whose messages are ignored.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Text message each client sends right after connecting (e.g. a subscribe).
    #[arg(long)]
    send: Option<String>,
    /// Extra handshake header, 'Name: value' (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Begin each connection with a PROXY protocol v1 header (the client's
    /// own addresses), for a gateway listener with `proxy_protocol: true`.
    #[arg(long)]
    proxy_protocol: bool,
    /// Bind client sockets to 127.0.0.1..127.0.0.N round-robin (for > ~28k
    /// connections; ignored unless the target is 127.x).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: u8,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// stream: measure pushed messages; nats: same over NATS-over-WebSocket;
    /// idle / nats-idle: connect and hold.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// NATS subject to subscribe to (nats modes).
    #[arg(long, default_value = "bench")]
    nats_subject: String,
    /// How long idle modes hold the connections.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: Duration,
    /// Messages/s each client should receive; adds expected_deliveries and delivery_ratio.
    #[arg(long)]
    expect_rate: Option<f64>,
    /// Limit for one client's connect + handshake (+ NATS subscribe).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Extra clients that connect first and never read (slow consumers
    /// beside the measured clients; stream and idle modes).
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// Socket receive buffer (SO_RCVBUF) of the stalled clients, in bytes.
    #[arg(long, default_value_t = 4096)]
    stalled_rcvbuf: u32,
    /// No progress output on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// NATS server address (plain TCP protocol port).
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats: String,
    /// Subject to publish on.
    #[arg(long, default_value = "bench")]
    subject: String,
    /// Messages per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the "pad" string (100 gives ~150-byte messages).
    #[arg(long, default_value_t = 100)]
    pad: usize,
    /// How long to publish.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    duration: Duration,
    /// No progress output on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// `10s`, `250ms`, `1m30s`, or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| e.to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("expected 'Name: value', got '{s}'"))?;
    let name = name.trim();
    let value = value.trim();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("bad header name '{name}'"));
    }
    if value.contains(['\r', '\n']) {
        return Err("header value must not contain CR or LF".into());
    }
    Ok((name.to_string(), value.to_string()))
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Publish(a)) => {
            let cfg = PublishConfig {
                nats: a.nats,
                subject: a.subject,
                rate: a.rate,
                pad: a.pad,
                duration: a.duration,
                progress: !a.quiet,
            };
            match runtime(1).block_on(publish(cfg)) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).expect("report serializes"));
                    if r.sent > 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("loadgen publish: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let a = cli.run;
            let threads = usize::from(a.threads);
            match loadgen::sys::raise_nofile_limit() {
                Ok(limit) => {
                    let needed = (a.clients + a.stalled) as u64 + 64;
                    if limit < needed {
                        eprintln!(
                            "loadgen: warning: open-file limit {limit} is below the {needed} this run needs"
                        );
                    }
                }
                Err(e) => eprintln!("loadgen: warning: cannot raise the open-file limit: {e}"),
            }
            let cfg = Config {
                url: a.url.expect("clap enforces --url"),
                spread: a.spread as usize,
                clients: a.clients,
                ramp: a.ramp,
                duration: a.duration,
                warmup: a.warmup,
                send: a.send,
                headers: a.headers,
                proxy_protocol: a.proxy_protocol,
                sources: a.sources,
                mode: a.mode,
                nats_subject: a.nats_subject,
                hold: a.hold,
                expect_rate: a.expect_rate,
                connect_timeout: a.connect_timeout,
                progress: !a.quiet,
                threads,
                on_measure_start: None,
                stalled: a.stalled,
                stalled_rcvbuf: a.stalled_rcvbuf,
            };
            if a.clients == 0 {
                eprintln!("loadgen: --clients must be at least 1");
                return ExitCode::from(2);
            }
            if !(cfg.ramp >= 0.0 && cfg.ramp.is_finite()) {
                eprintln!("loadgen: --ramp must be a non-negative number");
                return ExitCode::from(2);
            }
            if cfg.mode != Mode::Idle && cfg.mode != Mode::NatsIdle && cfg.duration.is_zero() {
                eprintln!("loadgen: --duration must be positive");
                return ExitCode::from(2);
            }
            match runtime(threads).block_on(run(cfg)) {
                Ok(report) => {
                    println!("{}", report.to_json());
                    if report.connected > 0 {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("loadgen: no client connected");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run_and_publish() {
        let c = Cli::try_parse_from([
            "loadgen",
            "--url",
            "ws://127.0.0.1:9900/bench",
            "--clients",
            "5",
            "--duration",
            "1.5",
            "--header",
            "X-Api-Key: secret: with colon",
            "--mode",
            "nats-idle",
        ])
        .unwrap();
        assert!(c.cmd.is_none());
        assert_eq!(c.run.clients, 5);
        assert_eq!(c.run.duration, Duration::from_millis(1500));
        assert_eq!(
            c.run.headers,
            vec![("X-Api-Key".into(), "secret: with colon".into())]
        );
        assert_eq!(c.run.mode, Mode::NatsIdle);

        let c = Cli::try_parse_from(["loadgen", "publish", "--rate", "50", "--duration", "2s"])
            .unwrap();
        let Some(Cmd::Publish(p)) = c.cmd else {
            panic!()
        };
        assert_eq!(
            (p.rate, p.duration, p.pad),
            (50.0, Duration::from_secs(2), 100)
        );

        assert!(
            Cli::try_parse_from(["loadgen"]).is_err(),
            "--url is required"
        );
        assert!(Cli::try_parse_from(["loadgen", "--url", "ws://x/", "--header", "bad"]).is_err());
        assert!(Cli::try_parse_from(["loadgen", "--url", "ws://x/", "--sources", "0"]).is_err());
        assert!(Cli::try_parse_from(["loadgen", "--url", "ws://x/{n}", "--spread", "0"]).is_err());
        let c = Cli::try_parse_from(["loadgen", "--url", "ws://x/{n}", "--spread", "10"]).unwrap();
        assert_eq!(c.run.spread, 10);
        let c = Cli::try_parse_from(["loadgen", "--url", "ws://x/"]).unwrap();
        assert_eq!(c.run.spread, 1);
        assert_eq!((c.run.stalled, c.run.stalled_rcvbuf), (0, 4096));
        assert!(!c.run.proxy_protocol);
        let c = Cli::try_parse_from(["loadgen", "--url", "ws://x/", "--proxy-protocol"]).unwrap();
        assert!(c.run.proxy_protocol);
        let c = Cli::try_parse_from([
            "loadgen",
            "--url",
            "ws://x/",
            "--stalled",
            "1",
            "--stalled-rcvbuf",
            "8192",
        ])
        .unwrap();
        assert_eq!((c.run.stalled, c.run.stalled_rcvbuf), (1, 8192));
        assert!(Cli::try_parse_from(["loadgen", "--url", "ws://x/", "--mode", "bogus"]).is_err());
    }
}
