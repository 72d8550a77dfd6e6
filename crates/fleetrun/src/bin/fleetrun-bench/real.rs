//! Real agents: K `fleetrun agent` processes on one server; the end-to-end fan-out of
//! `echo hi`, the CLI's single-target round trip, and what an idle agent costs.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::Settings;
use crate::measure::{FanoutSample, describe, fanout_trial};
use crate::procs::{CpuClock, Daemon, Memory, memory, timed_command};
use crate::server::Server;

/// Longest one CLI round trip may take before the benchmark gives up on it.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

pub(crate) struct RealResult {
    pub(crate) fanout: Vec<FanoutSample>,
    /// Spawn of `fleetrun run --machine real-0 true` to its exit.
    pub(crate) round_trips: Vec<Duration>,
    /// Median VmRSS over the agents, connected and idle before any run (KiB).
    pub(crate) rss_fresh_kib: u64,
    /// Median memory over the agents after all the runs: what an agent settles at once it
    /// has worked.
    pub(crate) idle: Memory,
    /// CPU of one agent while idle, in % of one core (all agents' CPU over the window / K).
    pub(crate) idle_cpu_pct: f64,
}

pub(crate) async fn measure(settings: &Settings, count: usize) -> anyhow::Result<RealResult> {
    let dir = settings.scratch.join("real");
    let mut server = Server::start(&settings.fleetrun, &dir.join("server")).await?;
    let mut agents = (0..count)
        .map(|index| start_agent(settings, &server, &dir, index))
        .collect::<anyhow::Result<Vec<Daemon>>>()?;
    let limit = Duration::from_secs(60) + Duration::from_millis(200 * count as u64);
    server
        .wait_online(count, limit, || {
            agents.iter_mut().try_for_each(Daemon::check_running)
        })
        .await?;
    eprintln!("  {count} real agents online");
    let pids: Vec<u32> = agents.iter().map(Daemon::pid).collect();
    tokio::time::sleep(settings.settle).await;
    let rss_fresh_kib = median_memory(&pids)?.rss;

    let mut fanout = Vec::new();
    for trial in 1..=settings.trials {
        let sample = fanout_trial(&server, count, None, &pids)
            .await
            .with_context(|| format!("fan-out trial {trial} on real agents"))?;
        eprintln!("  fan-out {trial}: {}", describe(&sample));
        fanout.push(sample);
    }
    let round_trips = round_trips(settings, &server, &dir).await?;

    tokio::time::sleep(settings.settle).await;
    let idle_memory = median_memory(&pids)?;
    let idle = CpuClock::start(&pids)?;
    tokio::time::sleep(2 * settings.cpu_window).await;
    let idle_cpu_pct = idle.percent()? / count as f64;
    agents.iter_mut().try_for_each(Daemon::check_running)?;
    Ok(RealResult {
        fanout,
        round_trips,
        rss_fresh_kib,
        idle: idle_memory,
        idle_cpu_pct,
    })
}

fn start_agent(
    settings: &Settings,
    server: &Server,
    dir: &Path,
    index: usize,
) -> anyhow::Result<Daemon> {
    let name = format!("real-{index}");
    let args = [
        "agent".to_string(),
        "--server".to_string(),
        server.url.clone(),
        "--enroll-token".to_string(),
        server.enroll_token.clone(),
        "--name".to_string(),
        name.clone(),
        "--state-dir".to_string(),
        dir.join(&name).display().to_string(),
    ];
    Daemon::spawn(
        &settings.fleetrun,
        &args,
        &dir.join(format!("{name}.log")),
        &format!("agent {name}"),
    )
}

/// `fleetrun run --machine real-0 true`, timed from spawn to exit, `round_trips` times.
async fn round_trips(
    settings: &Settings,
    server: &Server,
    dir: &Path,
) -> anyhow::Result<Vec<Duration>> {
    let env = [
        ("FLEETRUN_URL", server.url.as_str()),
        ("FLEETRUN_TOKEN", server.token.as_str()),
    ];
    let log = dir.join("cli.log");
    let mut times = Vec::with_capacity(settings.round_trips);
    for _ in 0..settings.round_trips {
        let args = ["run", "--machine", "real-0", "true"];
        times.push(timed_command(&settings.fleetrun, &args, &env, &log, COMMAND_LIMIT).await?);
    }
    if let Some(median) = crate::measure::Spread::of(times.iter().map(Duration::as_secs_f64)) {
        eprintln!("  CLI round trip: median {:.1} ms", median.median * 1e3);
    }
    Ok(times)
}

/// The median of each measure of memory over `pids`.
fn median_memory(pids: &[u32]) -> anyhow::Result<Memory> {
    let all = pids
        .iter()
        .map(|pid| memory(*pid))
        .collect::<anyhow::Result<Vec<Memory>>>()?;
    let median = |field: fn(&Memory) -> u64| -> anyhow::Result<u64> {
        let mut values: Vec<u64> = all.iter().map(field).collect();
        values.sort_unstable();
        values
            .get(values.len() / 2)
            .copied()
            .context("no agents to measure")
    };
    Ok(Memory {
        rss: median(|memory| memory.rss)?,
        anon: median(|memory| memory.anon)?,
        pss: median(|memory| memory.pss)?,
    })
}
