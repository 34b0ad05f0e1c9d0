//! The command line: `switchyard demo | run | check`. Bad arguments or
//! configuration exit with status 64 (EX_USAGE) and a one-line reason;
//! nothing is started half-way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard_control::config::Config;

use crate::demo::{self, DemoAddrs};
use crate::server::{metrics_for, watch_config, Listeners, Proxy, StartError, StartOptions};

/// EX_USAGE from sysexits.h: the command was used incorrectly.
pub const EXIT_USAGE: u8 = 64;
/// How often `run` looks for a changed configuration file.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// EX_DATAERR: the persisted state in `state_dir` cannot be used.
pub const EXIT_DATAERR: u8 = 65;
/// Start-up failed for a reason outside the configuration (port in use...).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Traffic-shifting HTTP proxy: sticky blue/green and canary splits by user",
    after_help = "Exit status: 0 after a clean stop, 64 for bad arguments or configuration, 65 for an unusable state file, 1 if start-up failed otherwise.\nLogging: RUST_LOG (default `info`)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process, no files: three demo upstreams (blue, green,
    /// canary) behind the proxy, an open loopback admin listener, and curl
    /// lines to try.
    Demo {
        /// Proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
        /// Requests per second the demo sends through its own proxy (users
        /// demo-0 to demo-499), so its rollout advances by itself; 0: none.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
        traffic_rate: u32,
    },
    /// Run the proxy (sidecar or edge gateway) from a configuration file.
    Run {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Move the state file in `state_dir` aside (kept as
        /// `state.json.reset-<time>`) and start from the configuration.
        #[arg(long)]
        reset_state: bool,
    },
    /// Talk to a running proxy's admin API: status, weights, flags, stats,
    /// events.
    #[command(
        after_help = "Exit status: 0 done, 1 refused by the API or the proxy unreachable, 64 bad arguments."
    )]
    Ctl(switchyard_control::ctl::CtlArgs),
    /// Validate a configuration file and exit; errors name the field.
    Check {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Add the Switchyard sidecar to Kubernetes manifests: every Deployment,
    /// StatefulSet and DaemonSet pod template gets the container (as
    /// manifests/components/switchyard defines it) and a ConfigMap with its
    /// configuration, and the Services selecting those pods go through the
    /// proxy. Writes the manifests to standard output, what changed to
    /// standard error; idempotent.
    Inject {
        /// Manifests (multi-document YAML); `-` or nothing reads standard
        /// input.
        file: Option<PathBuf>,
        /// The application's port (default: its first container's first
        /// `containerPort`).
        #[arg(long)]
        app_port: Option<u16>,
    },
    /// Print a shell completion script, e.g.
    /// `switchyard completions bash > /etc/bash_completion.d/switchyard`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first paragraph is the reason; usage and tips follow.
            let text = e.to_string();
            let reason: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.is_empty())
                .collect();
            // clap's "did you mean" tips are worth keeping.
            let tips: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("tip:"))
                .collect();
            eprintln!("{} (see `switchyard --help`)", reason.join(" "));
            for tip in tips {
                eprintln!("  {tip}");
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Inject { file, app_port } => {
            let input = match file.as_deref().filter(|f| f.as_os_str() != "-") {
                Some(path) => {
                    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
                }
                None => std::io::read_to_string(std::io::stdin())
                    .map_err(|e| format!("standard input: {e}")),
            };
            let injected = input
                .and_then(|text| crate::inject::inject(&text, app_port).map_err(|e| e.to_string()));
            match injected {
                Ok((manifests, notes)) => {
                    for note in notes {
                        eprintln!("switchyard inject: {note}");
                    }
                    print!("{manifests}");
                    ExitCode::SUCCESS
                }
                Err(e) => usage_error(&e),
            }
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "switchyard", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Check { config } => match check(&config) {
            Ok(summary) => {
                println!("{}: ok ({summary})", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(&e),
        },
        Command::Run {
            config: config_file,
            reset_state,
        } => {
            let config = match Config::load(&config_file) {
                Ok(c) => c,
                Err(e) => return usage_error(&e),
            };
            init_logging();
            let workers = config.worker_threads();
            let metrics = metrics_for(&config);
            let proxy = match Proxy::new(config.clone(), metrics, StartOptions { reset_state }) {
                Ok(p) => p,
                Err(StartError::Config(e)) => return usage_error(&e),
                Err(StartError::State(e)) => {
                    eprintln!("switchyard: {e}");
                    return ExitCode::from(EXIT_DATAERR);
                }
            };
            block_on(workers, async move {
                // Signal handlers first: nothing may be served before SIGTERM
                // and SIGHUP mean drain and reload.
                let shutdown = shutdown_signal();
                let watcher = tokio::spawn(watch_config(proxy.handle(), config_file, CONFIG_POLL));
                let listeners = Listeners::bind(&config).await?;
                release_start_up_code();
                proxy.run(listeners, shutdown).await;
                watcher.abort();
                Ok(())
            })
        }
        Command::Ctl(args) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => ExitCode::from(rt.block_on(switchyard_control::ctl::run(args))),
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Demo {
            listen,
            admin_listen,
            traffic_rate,
        } => {
            init_logging();
            block_on(1, async move {
                let shutdown = shutdown_signal();
                demo::run(
                    DemoAddrs {
                        listen,
                        admin: admin_listen,
                        traffic_rate,
                    },
                    shutdown,
                )
                .await?;
                Ok(())
            })
        }
    }
}

/// Everything `run` would check before serving: the file, the token files
/// and the TLS files (readable, key matching certificate, valid now).
fn check(path: &std::path::Path) -> Result<String, switchyard_control::config::ConfigError> {
    let c = Config::load(path)?;
    c.admin.resolve_tokens()?;
    crate::tls::check_upstreams(&c)?;
    let backends: usize = c.routes.iter().map(|r| r.backends.len()).sum();
    let mut summary = format!("{} route(s), {backends} backend(s)", c.routes.len());
    if let Some(fleet) = &c.fleet {
        let joined = switchyard_control::fleet::Fleet::new(fleet)?;
        summary.push_str(&format!(
            "; fleet: replica `{}`, state in etcd under {} ({} endpoint(s)); this file's weights and flags seed the fleet only while that prefix is empty, after that etcd is the truth",
            joined.replica_id,
            joined.prefix(),
            fleet.etcd.endpoints.len()
        ));
    }
    match switchyard_control::store::check_state(&c) {
        Ok(Some(state)) => summary.push_str(&format!("; {state}")),
        Ok(None) => {}
        Err(e) => {
            return Err(switchyard_control::config::ConfigError::new(
                "state_dir",
                e.to_string(),
            ))
        }
    }
    if let Some(tls) = &c.tls {
        let loaded = crate::tls::load(tls, std::time::SystemTime::now())?;
        for cert in &loaded.certificates {
            let days =
                (cert.not_after - crate::tls::unix_secs(std::time::SystemTime::now())) / 86_400;
            summary.push_str(&format!(
                "; {}: [{}] expires in {days} day(s)",
                cert.file.display(),
                cert.names.join(", ")
            ));
        }
    }
    Ok(summary)
}

fn usage_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("switchyard: {e}");
    ExitCode::from(EXIT_USAGE)
}

/// Runs `fut` on a runtime with `workers` threads: 1 is a current-thread
/// runtime (no cross-thread handoffs), more is the multi-threaded scheduler.
fn block_on(
    workers: usize,
    fut: impl std::future::Future<Output = std::io::Result<()>>,
) -> ExitCode {
    let runtime = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let result = match runtime {
        Ok(rt) => rt.block_on(fut),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The h2 crate warns once per connection it closes for a reset flood:
    // an attacker's line per connection. Switchyard counts those and warns
    // at most every 10 s (`switchyard_http2_flood_closed_total`); RUST_LOG
    // naming h2 still gets its own lines.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("h2")) {
        filter = filter.add_directive("h2=error".parse().expect("valid directive"));
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Resolves on the first SIGTERM or SIGINT.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: a signal that arrives while start-up finishes is still a
/// graceful stop, never the default action (termination).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
}

/// Start-up is over (configuration read and checked, state loaded,
/// listeners bound): the code only it ran leaves the resident set
/// (`trim/src/lib.rs`, docs/decisions.md). Once per process, from the
/// binary only: the library's `Proxy::run` leaves its host's code alone.
/// Failing is harmless, and only logged.
fn release_start_up_code() {
    let released = switchyard_trim::release_program_text();
    tracing::debug!(
        bytes = released.bytes,
        kept = released.kept,
        failed = released.failed,
        "start-up code pages released"
    );
}
