//! The `gateway` binary: a thin shell over the library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::config::{self, LoadOptions, LogFormat};

/// A plugin-driven real-time WebSocket gateway.
///
/// Without a subcommand, serves the configuration. Channels, endpoints and
/// sources are described in YAML (gateway.yaml and the channel specs it
/// names); data comes from source plugins loaded from `plugins.dirs`.
#[derive(Parser, Debug)]
#[command(name = "gateway", version, about, long_about)]
struct Cli {
    /// Path to gateway.yaml.
    #[arg(long, short, global = true, default_value = "gateway.yaml")]
    config: PathBuf,
    /// Replace `plugins.dirs` (repeat for several directories).
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Override a listener's bind address, e.g. `--listen main=127.0.0.1:0` (repeatable).
    #[arg(long, global = true, value_name = "NAME=ADDR")]
    listen: Vec<String>,
    /// Log format (overrides `log.format`): text or json.
    #[arg(long, global = true, value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the configuration (the default).
    Serve,
    /// Load, validate and compile everything (schemas, plugins found and
    /// ABI-checked) without serving; print every error; exit 1 on any.
    Check,
    /// Load the configuration and print its AsyncAPI 3.0 document (JSON):
    /// listeners, endpoints, the messages of every channel with their
    /// schemas, the client messages of each protocol, the auth schemes.
    Asyncapi,
    /// Print the JSON Schema of gateway.yaml or of channel spec files (for
    /// editors; the repository's copies are in docs/schema/).
    Schema {
        /// Which file: `gateway` (gateway.yaml) or `channel` (a channel spec).
        #[arg(value_enum)]
        file: SchemaFile,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SchemaFile {
    /// gateway.yaml.
    Gateway,
    /// A channel spec file.
    Channel,
}

fn options(cli: &Cli) -> Result<LoadOptions, String> {
    let mut listen = BTreeMap::new();
    for l in &cli.listen {
        let (name, addr) = l
            .split_once('=')
            .ok_or_else(|| format!("--listen {l:?}: write NAME=ADDR, e.g. main=127.0.0.1:0"))?;
        listen.insert(name.to_string(), addr.to_string());
    }
    Ok(LoadOptions {
        plugin_dirs: (!cli.plugin_dirs.is_empty()).then(|| cli.plugin_dirs.clone()),
        listen,
        ..Default::default()
    })
}

/// Sets the runtime's async workers (docs/operations.md, "Worker threads").
const WORKER_THREADS: &str = "TOKIO_WORKER_THREADS";

/// `TOKIO_WORKER_THREADS`, when set, must be what tokio accepts (a whole
/// number of at least 1, nothing around it): tokio panics on anything else.
fn check_worker_threads(value: Option<std::ffi::OsString>) -> Result<(), String> {
    let Some(v) = value else {
        return Ok(());
    };
    match v.to_str().map(str::parse::<usize>) {
        Some(Ok(n)) if n > 0 => Ok(()),
        _ => Err(format!(
            "{WORKER_THREADS}={:?}: the number of async worker threads must be a whole number of at least 1 (unset it for one per core)",
            v.to_string_lossy()
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Schema { file }) = &cli.command {
        let kind = match file {
            SchemaFile::Gateway => config::schema::SchemaKind::Gateway,
            SchemaFile::Channel => config::schema::SchemaKind::Channel,
        };
        print!("{}", config::schema::render(kind));
        return ExitCode::SUCCESS;
    }
    let opts = match options(&cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let format = match cli.log_format.as_deref() {
        None => None,
        Some("text") => Some(LogFormat::Text),
        Some("json") => Some(LogFormat::Json),
        Some(other) => {
            eprintln!("error: --log-format {other:?}: use text or json");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = check_worker_threads(std::env::var_os(WORKER_THREADS)) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cfg = match config::load(&cli.config, &opts) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{} error(s) in {}", errors.0.len(), cli.config.display());
            return ExitCode::FAILURE;
        }
    };
    gateway::logging::init(&cfg.log_level, format.unwrap_or(cfg.log_format));
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    if matches!(cli.command, Some(Command::Asyncapi)) {
        let doc = gateway::asyncapi::document(&cfg, None);
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    if matches!(cli.command, Some(Command::Check)) {
        let mut plugins: std::collections::BTreeSet<&str> = cfg
            .channels
            .iter()
            .filter_map(|c| c.source.plugin().map(|p| p.name.as_str()))
            .collect();
        if plugins.is_empty() {
            plugins.insert("none");
        }
        println!(
            "{}: OK ({} listener(s), {} channel(s), {} endpoint(s), plugins: {})",
            cli.config.display(),
            cfg.listeners.len(),
            cfg.channels.len(),
            cfg.endpoints.len(),
            plugins.into_iter().collect::<Vec<_>>().join(", ")
        );
        for w in &cfg.warnings {
            println!("warning: {w}");
        }
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(serve(cfg));
    // Plugin threads that ignore stop must not hold the process past the
    // shutdown deadline.
    std::process::exit(code)
}

async fn serve(cfg: config::Config) -> i32 {
    let gw = match gateway::Gateway::start(cfg).await {
        Ok(g) => g,
        Err(errors) => {
            eprintln!("{errors}");
            return 1;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => loop {
                tokio::select! {
                    _ = wait_for_signal() => break,
                    _ = hup.recv() => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        // Errors are logged by the reload; the running
                        // configuration stays.
                        let _ = gw.reload().await;
                    }
                }
            },
            Err(_) => wait_for_signal().await,
        }
    }
    #[cfg(not(unix))]
    wait_for_signal().await;
    // A second signal exits at once.
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    if gw.shutdown().await { 0 } else { 1 }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
