//! The measurements: fan-out trials against a server, throughput bursts, and the simulated
//! agents' phase (one server, N agents) from start to teardown.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use proto::api::{CreateRun, Run, TargetsBody};

use crate::Settings;
use crate::fleet::{Fleet, ProbeReading};
use crate::procs::{CpuClock, FdLimit, rss_kib};
use crate::server::Server;

/// Long polls of `GET /v1/runs/{id}?wait=5s` before a run counts as stuck: ten minutes. The
/// server answers as soon as the run is done, so the poll length does not change what is
/// measured; a short one notices lost agents or a dead server quickly.
const WAIT_POLLS: usize = 120;
const WAIT_POLL: Duration = Duration::from_secs(5);

/// Smallest, middle and largest of some samples.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// `None` for no samples.
    pub(crate) fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut sorted: Vec<f64> = values.into_iter().collect();
        sorted.sort_by(f64::total_cmp);
        let count = sorted.len();
        let median = match count {
            0 => return None,
            _ if count % 2 == 1 => sorted[count / 2],
            _ => (sorted[count / 2 - 1] + sorted[count / 2]) / 2.0,
        };
        Some(Self {
            min: sorted[0],
            median,
            max: sorted[count - 1],
        })
    }

    /// One value measured once.
    pub(crate) fn single(value: f64) -> Self {
        Self {
            min: value,
            median: value,
            max: value,
        }
    }
}

/// One run of `echo hi` on every machine, timed from just before the POST.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FanoutSample {
    /// Until `GET /v1/runs/{id}?wait=` answered that the run is done.
    pub(crate) total: Duration,
    /// Until `POST /v1/runs` answered.
    pub(crate) post: Duration,
    /// Until the first execution was terminal and stored.
    pub(crate) first_result: Option<Duration>,
    /// What the simulated agents saw (none for real agents).
    pub(crate) probe: Option<ProbeReading>,
    /// CPU of the server during the trial, in % of one core.
    pub(crate) server_cpu_pct: f64,
    /// CPU of the other side (this load generator, or the real agents together).
    pub(crate) agents_cpu_pct: f64,
}

/// Everything measured with N simulated agents on one server.
pub(crate) struct SimulatedResult {
    pub(crate) fanout: Vec<FanoutSample>,
    /// Executions per second of each throughput trial (`burst` runs started at once).
    pub(crate) executions_per_s: Vec<f64>,
    /// Server RSS right after start, with no machine enrolled.
    pub(crate) rss_idle_kib: u64,
    /// After enrolling N machines, none connected.
    pub(crate) rss_enrolled_kib: u64,
    /// With N agents connected and idle, before any run.
    pub(crate) rss_connected_kib: u64,
    /// After all trials.
    pub(crate) rss_after_kib: u64,
    pub(crate) idle_cpu_pct: f64,
    pub(crate) enroll: Duration,
    pub(crate) connect: Duration,
}

/// The run every trial starts: `echo hi` on every enrolled machine.
fn echo_hi() -> CreateRun {
    CreateRun {
        targets: TargetsBody {
            all: true,
            ..TargetsBody::default()
        },
        script: "echo hi".to_string(),
        ..CreateRun::default()
    }
}

/// Starts a server, measures it idle, enrolls and connects `agents` simulated agents, then
/// times fan-outs and throughput. `phase` numbers the servers of one benchmark.
pub(crate) async fn simulated(
    settings: &Settings,
    phase: usize,
    agents: usize,
    fd_limit: &FdLimit,
) -> anyhow::Result<SimulatedResult> {
    fd_limit.check(agents)?;
    let dir = settings.scratch.join(format!("simulated-{phase}-{agents}"));
    let mut server = Server::start(&settings.fleetrun, &dir).await?;
    let pid = server.pid();
    tokio::time::sleep(settings.settle).await;
    let rss_idle_kib = rss_kib(pid)?;

    let started = Instant::now();
    let names = (0..agents).map(|index| format!("sim-{index}")).collect();
    let tokens = server.enroll(names).await?;
    let enroll = started.elapsed();
    let rss_enrolled_kib = rss_kib(pid)?;
    eprintln!("  enrolled {agents} in {:.1} s", enroll.as_secs_f64());

    let started = Instant::now();
    // Fresh source addresses per server (127.10.x.y, 127.11.x.y, ...).
    let network = 10 + (phase % 200) as u8;
    let limit = Duration::from_secs(60) + Duration::from_millis(2 * agents as u64);
    let fleet = Fleet::connect(server.address, tokens, network, limit).await?;
    server
        .wait_online(agents, Duration::from_secs(120), || fleet.check())
        .await?;
    let connect = started.elapsed();
    eprintln!("  connected {agents} in {:.1} s", connect.as_secs_f64());

    tokio::time::sleep(settings.settle).await;
    let rss_connected_kib = rss_kib(pid)?;
    let idle = CpuClock::start(&[pid])?;
    tokio::time::sleep(settings.cpu_window).await;
    let idle_cpu_pct = idle.percent()?;
    fleet.check()?;

    let mut fanout = Vec::new();
    for trial in 1..=settings.trials {
        let sample = fanout_trial(&server, agents, Some(&fleet), &[std::process::id()])
            .await
            .with_context(|| format!("fan-out trial {trial}"))?;
        wait_for_acks(&fleet, agents).await?;
        eprintln!("  fan-out {trial}: {}", describe(&sample));
        fanout.push(sample);
    }
    let mut executions_per_s = Vec::new();
    for trial in 1..=settings.trials {
        let rate = throughput_trial(&server, agents, settings.burst, Some(&fleet))
            .await
            .with_context(|| format!("throughput trial {trial}"))?;
        fleet.check()?;
        eprintln!("  throughput {trial}: {rate:.0} executions/s");
        executions_per_s.push(rate);
    }
    let rss_after_kib = rss_kib(pid)?;
    Ok(SimulatedResult {
        fanout,
        executions_per_s,
        rss_idle_kib,
        rss_enrolled_kib,
        rss_connected_kib,
        rss_after_kib,
        idle_cpu_pct,
        enroll,
        connect,
    })
}

/// A trial's figures on one line, for the progress log.
pub(crate) fn describe(sample: &FanoutSample) -> String {
    let seconds = |moment: Option<Duration>| {
        moment.map_or("-".to_string(), |moment| {
            format!("{:.3}", moment.as_secs_f64())
        })
    };
    let mut text = format!(
        "done {:.3} s, POST answered {:.3} s, first result {} s",
        sample.total.as_secs_f64(),
        sample.post.as_secs_f64(),
        seconds(sample.first_result)
    );
    if let Some(probe) = sample.probe {
        text.push_str(&format!(
            ", Execute first/last {}/{} s, last Ack {} s",
            seconds(probe.first_execute),
            seconds(probe.last_execute),
            seconds(probe.last_ack)
        ));
    }
    text.push_str(&format!(
        ", CPU server {:.0} % agents {:.0} %",
        sample.server_cpu_pct, sample.agents_cpu_pct
    ));
    text
}

/// Runs `echo hi` on all `expected` machines and times it. `agents` are the processes on the
/// other side, whose CPU is measured alongside the server's; `fleet`, the simulated agents.
pub(crate) async fn fanout_trial(
    server: &Server,
    expected: usize,
    fleet: Option<&Fleet>,
    agents: &[u32],
) -> anyhow::Result<FanoutSample> {
    let probe = fleet.map(|fleet| &*fleet.probe);
    let server_cpu = CpuClock::start(&[server.pid()])?;
    let agents_cpu = CpuClock::start(agents)?;
    let start = match probe {
        Some(probe) => probe.reset(),
        None => Instant::now(),
    };
    let run = server
        .client
        .create_run(&echo_hi())
        .await
        .context("POST /v1/runs")?;
    let post = start.elapsed();
    let done = wait_done(server, &run.id, fleet).await?;
    let total = start.elapsed();
    let server_cpu_pct = server_cpu.percent()?;
    let agents_cpu_pct = agents_cpu.percent()?;
    check_succeeded(&done, expected)?;
    let probe = probe.map(|probe| probe.read(start));
    if let Some(reading) = probe
        && reading.executes != expected as u64
    {
        bail!(
            "the agents received {} Execute messages for {expected} executions",
            reading.executes
        );
    }
    // An Ack is sent once the result is stored: the simulated agents see the first stored
    // result to the microsecond. Real agents' results are read from the stored times (ms).
    let first_result = match probe {
        Some(reading) => reading.first_ack,
        None => first_finished(&done),
    };
    Ok(FanoutSample {
        total,
        post,
        first_result,
        probe,
        server_cpu_pct,
        agents_cpu_pct,
    })
}

/// Waits until every agent has its `Ack`, so that a late one cannot land in the next trial.
async fn wait_for_acks(fleet: &Fleet, expected: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        fleet.check()?;
        if fleet.probe.acks() >= expected as u64 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("the run was done but not every agent had its Ack after 30 s")
}

/// Starts `runs` runs at once on all `expected` machines and answers executions per second
/// from the first POST until the last run is done.
async fn throughput_trial(
    server: &Server,
    expected: usize,
    runs: usize,
    fleet: Option<&Fleet>,
) -> anyhow::Result<f64> {
    let run = echo_hi();
    let started = Instant::now();
    let created =
        futures_util::future::try_join_all((0..runs).map(|_| server.client.create_run(&run)))
            .await
            .context("POST /v1/runs")?;
    for run in &created {
        let done = wait_done(server, &run.id, fleet).await?;
        check_succeeded(&done, expected)?;
    }
    Ok((runs * expected) as f64 / started.elapsed().as_secs_f64())
}

fn is_done(run: &Run) -> bool {
    matches!(run.status.as_str(), "succeeded" | "failed" | "canceled")
}

/// The run once it is done, through bounded long polls. Between polls, an error if the server
/// died or a simulated agent lost its connection (the run could not complete then).
async fn wait_done(server: &Server, id: &str, fleet: Option<&Fleet>) -> anyhow::Result<Run> {
    for _ in 0..WAIT_POLLS {
        server.daemon.check_alive()?;
        if let Some(fleet) = fleet {
            fleet.check()?;
        }
        // The server holds the answer at most WAIT_POLL; this guards against one that hangs.
        let answer = tokio::time::timeout(
            WAIT_POLL + Duration::from_secs(30),
            server.client.run(id, Some(WAIT_POLL)),
        )
        .await
        .with_context(|| format!("GET /v1/runs/{id}?wait= did not answer"))?;
        let run = answer.with_context(|| format!("GET /v1/runs/{id}"))?;
        if is_done(&run) {
            return Ok(run);
        }
    }
    bail!(
        "run {id} was not done after {WAIT_POLLS} waits of {WAIT_POLL:?}; the server's log:\n{}",
        server.daemon.log_tail()
    )
}

/// An error unless every one of `expected` executions succeeded with its three bytes stored.
fn check_succeeded(run: &Run, expected: usize) -> anyhow::Result<()> {
    let succeeded = run.counts.get("succeeded").copied().unwrap_or(0);
    if run.status != "succeeded" || run.total != expected as u64 || succeeded != expected as u64 {
        bail!(
            "run {} ended {} with {succeeded} of {} executions succeeded ({expected} expected): \
             {:?}",
            run.id,
            run.status,
            run.total,
            run.counts
        );
    }
    let executions = run.executions.as_deref().unwrap_or_default();
    let stored = executions
        .iter()
        .filter(|execution| execution.state == "succeeded" && execution.stdout_bytes == 3)
        .count();
    if stored != expected {
        bail!(
            "run {} lists {stored} executions that succeeded with `hi\\n` stored, of {expected}",
            run.id
        );
    }
    Ok(())
}

/// From the run's creation to its first finished execution, by the stored times.
fn first_finished(run: &Run) -> Option<Duration> {
    let parse = |text: &str| humantime::parse_rfc3339_weak(text).ok();
    let created: SystemTime = parse(&run.created_at)?;
    let first = run
        .executions
        .as_deref()?
        .iter()
        .filter_map(|execution| execution.finished_at.as_deref().and_then(parse))
        .min()?;
    Some(first.duration_since(created).unwrap_or_default())
}
