//! `fleetrun-bench`: how fast a real fleetrun server fans a command out to N agents and gets
//! the results back, and what it and its agents cost while idle. See `docs/BENCHMARKS.md`.
//!
//! It drives the real `fleetrun` binary (server, agents, CLI) on loopback; the simulated
//! agents live in this process, each a real WebSocket speaking the real agent protocol.

mod fleet;
mod measure;
mod procs;
mod real;
mod report;
mod server;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

/// Benchmark a fleetrun server with simulated and real agents on loopback.
#[derive(Parser)]
#[command(name = "fleetrun-bench", max_term_width = 100)]
struct Args {
    /// Numbers of simulated agents to measure, one server each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    agents: Vec<usize>,
    /// Real `fleetrun agent` processes to measure (0 skips).
    #[arg(long, default_value_t = 50)]
    real_agents: usize,
    /// Trials per measure; each measure reports min/median/max over them.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Runs started at once in each throughput trial (executions per second).
    #[arg(long, default_value_t = 3)]
    burst: usize,
    /// Single-target round trips through the CLI.
    #[arg(long, default_value_t = 20)]
    round_trips: usize,
    /// How long the server's idle CPU is sampled (the agents' over twice this).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    cpu_window: Duration,
    /// Pause after connections are made, before memory is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `fleetrun` binary [default: the one next to this executable].
    #[arg(long)]
    fleetrun: Option<PathBuf>,
}

/// What every measurement needs to know.
pub(crate) struct Settings {
    pub(crate) fleetrun: PathBuf,
    /// Scratch space: servers' data directories, agents' state, logs. Removed at the end.
    pub(crate) scratch: PathBuf,
    pub(crate) trials: usize,
    pub(crate) burst: usize,
    pub(crate) round_trips: usize,
    pub(crate) cpu_window: Duration,
    pub(crate) settle: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fleetrun-bench: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // Simulated agents' tasks were aborted with their fleet; do not wait on stragglers.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleetrun-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The benchmark, abandoned on Ctrl-C or SIGTERM. Abandoning it drops every guard it holds,
/// which kills and reaps the processes it started and removes its scratch directory.
async fn run(args: Args) -> anyhow::Result<()> {
    tokio::select! {
        result = benchmark(&args) => result,
        signal = procs::stop_signal() => bail!("stopped by {signal}; its processes were killed"),
    }
}

async fn benchmark(args: &Args) -> anyhow::Result<()> {
    check_args(args)?;
    let fleetrun = locate_fleetrun(args.fleetrun.as_deref())?;
    let largest = args.agents.iter().copied().max().unwrap_or(0);
    let fd_limit = procs::raise_fd_limit(largest);
    eprintln!("file descriptors: {}", fd_limit.describe());
    let scratch = tempfile::Builder::new()
        .prefix("fleetrun-bench-")
        .tempdir()
        .context("creating a scratch directory")?;
    let settings = Settings {
        fleetrun,
        scratch: scratch.path().to_path_buf(),
        trials: args.trials,
        burst: args.burst,
        round_trips: args.round_trips,
        cpu_window: args.cpu_window,
        settle: args.settle,
    };

    let mut simulated = Vec::new();
    for (phase, &agents) in args.agents.iter().enumerate() {
        eprintln!("== {agents} simulated agents");
        let result = measure::simulated(&settings, phase, agents, &fd_limit).await;
        if let Err(error) = &result {
            eprintln!("{agents} simulated agents failed: {error:#}");
        }
        simulated.push((agents, result));
    }
    let real = if args.real_agents > 0 {
        eprintln!("== {} real agents", args.real_agents);
        let result = real::measure(&settings, args.real_agents).await;
        if let Err(error) = &result {
            eprintln!("{} real agents failed: {error:#}", args.real_agents);
        }
        Some((args.real_agents, result))
    } else {
        None
    };

    let report = report::Report {
        simulated,
        real,
        burst: args.burst,
    };
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.json())
            .context("rendering the results as JSON")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if report.failed() {
        bail!("some measurements could not be taken (see above)");
    }
    Ok(())
}

fn check_args(args: &Args) -> anyhow::Result<()> {
    if args.agents.contains(&0) {
        bail!("--agents: every count must be at least 1");
    }
    if args.trials == 0 || args.burst == 0 {
        bail!("--trials and --burst must be at least 1");
    }
    Ok(())
}

/// The `fleetrun` binary: as given, or the one built next to this executable.
fn locate_fleetrun(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .with_file_name("fleetrun"),
    };
    if !path.is_file() {
        bail!(
            "no fleetrun binary at {}: build it with `cargo build --release -p fleetrun` (it lands \
             next to fleetrun-bench) or pass --fleetrun PATH",
            path.display()
        );
    }
    Ok(path)
}
