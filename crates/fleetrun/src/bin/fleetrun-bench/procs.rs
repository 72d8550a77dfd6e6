//! Processes the benchmark starts (killed and reaped when their guard drops), what `/proc`
//! says they cost, and the file-descriptor limit.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// Variables of the caller's shell that would point a child at another server.
const SCRUBBED: &[&str] = &[
    "FLEETRUN_URL",
    "FLEETRUN_TOKEN",
    "FLEETRUN_ENROLL_TOKEN",
    "FLEETRUN_SERVER",
    "FLEETRUN_CONFIG",
];

/// Descriptors kept free beyond one per agent: the database, HTTP clients, logs, pipes.
const FD_MARGIN: u64 = 2048;

/// A long-running `fleetrun` process (server or agent) logging to a file; SIGKILLed and
/// reaped when dropped, so an error or Ctrl-C anywhere leaves nothing behind.
pub(crate) struct Daemon {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Daemon {
    pub(crate) fn spawn(
        program: &Path,
        args: &[String],
        log: &Path,
        what: &str,
    ) -> anyhow::Result<Self> {
        let stdout = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stderr = stdout
            .try_clone()
            .context("duplicating a log file handle")?;
        let mut command = Command::new(program);
        for name in SCRUBBED {
            command.env_remove(name);
        }
        let child = command
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {what} ({})", program.display()))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
            what: what.to_string(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the end of its log if the process has exited.
    pub(crate) fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); the end of its log:\n{}",
                self.what,
                log_tail(&self.log, 30)
            ),
            Err(error) => Err(anyhow!(error).context(format!("checking on {}", self.what))),
        }
    }

    /// Like `check_running`, through `/proc` so that it needs no `&mut`: the process may be
    /// a zombie, not yet reaped, by then.
    pub(crate) fn check_alive(&self) -> anyhow::Result<()> {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].trim_start().chars().next());
        match state {
            Some(state) if state != 'Z' && state != 'X' => Ok(()),
            _ => bail!(
                "{} exited; the end of its log:\n{}",
                self.what,
                log_tail(&self.log, 30)
            ),
        }
    }

    /// The end of its log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, 30)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A short-lived child (a CLI command). If it is still running when dropped (the benchmark
/// was interrupted), it is killed and reaped here rather than left to the runtime.
struct ShortLived {
    child: tokio::process::Child,
}

impl Drop for ShortLived {
    fn drop(&mut self) {
        // `id()` is `None` once the child has been waited for: nothing to do then.
        if let Some(pid) = self.child.id() {
            let _ = self.child.start_kill();
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        }
    }
}

/// Runs `program args` with `env` and answers how long it took from spawn to exit. Its output
/// goes to `log`, quoted in the error if it fails or outlives `limit`.
pub(crate) async fn timed_command(
    program: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let stdout = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let stderr = stdout
        .try_clone()
        .context("duplicating a log file handle")?;
    let mut command = tokio::process::Command::new(program);
    for name in SCRUBBED {
        command.env_remove(name);
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let started = Instant::now();
    let mut running = ShortLived {
        child: command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?,
    };
    let status = tokio::time::timeout(limit, running.child.wait()).await;
    let elapsed = started.elapsed();
    let shown = format!("`fleetrun {}`", args.join(" "));
    match status {
        Err(_) => bail!("{shown} did not finish within {limit:?}"),
        Ok(Err(error)) => Err(anyhow!(error).context(format!("waiting for {shown}"))),
        Ok(Ok(status)) if !status.success() => {
            bail!("{shown} failed ({status}):\n{}", log_tail(log, 20))
        }
        Ok(Ok(_)) => Ok(elapsed),
    }
}

/// Resident memory of process `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    kib_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// What a process's resident memory is made of, in KiB.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// All resident pages, shared ones included (`VmRSS`).
    pub(crate) rss: u64,
    /// Its own heap and stacks (`RssAnon`): what another process cannot share.
    pub(crate) anon: u64,
    /// Shared pages split among the processes that map them (`Pss`): the binary's code is
    /// mapped by every agent (and the server) but resident once.
    pub(crate) pss: u64,
}

pub(crate) fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = format!("/proc/{pid}/status");
    Ok(Memory {
        rss: kib_field(&status, "VmRSS:")?,
        anon: kib_field(&status, "RssAnon:")?,
        pss: kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")?,
    })
}

/// The `Name:   123 kB` line `name` of a `/proc` file, in KiB.
fn kib_field(path: &str, name: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {name} in {path}"))
}

/// CPU time process `pid` has used (user + system), in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name is in parentheses and may hold spaces: count fields after the last `)`.
    // There, utime and stime are the 12th and 13th (fields 14 and 15 of proc(5)).
    let rest = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("malformed {path}"))
    };
    Ok(ticks(11)? + ticks(12)?)
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` CPU times.
fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        // Linux has used 100 on every architecture for decades.
        _ => 100.0,
    }
}

/// CPU used by some processes from a starting point on.
pub(crate) struct CpuClock {
    pids: Vec<u32>,
    ticks: u64,
    started: Instant,
}

impl CpuClock {
    pub(crate) fn start(pids: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            pids: pids.to_vec(),
            ticks: total_ticks(pids)?,
            started: Instant::now(),
        })
    }

    /// CPU used since the start by all the processes together, in % of one core.
    pub(crate) fn percent(&self) -> anyhow::Result<f64> {
        let used = total_ticks(&self.pids)?.saturating_sub(self.ticks) as f64 / ticks_per_second();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        Ok(100.0 * used / elapsed)
    }
}

fn total_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|pid| cpu_ticks(*pid)).sum()
}

/// The per-process file-descriptor limit, before and after trying to raise it.
pub(crate) struct FdLimit {
    pub(crate) before: u64,
    pub(crate) hard_before: u64,
    pub(crate) now: u64,
    /// Why raising it failed, if it did.
    pub(crate) failure: Option<String>,
}

impl FdLimit {
    pub(crate) fn describe(&self) -> String {
        let mut text = format!(
            "limit {} (was soft {}, hard {})",
            self.now, self.before, self.hard_before
        );
        if let Some(failure) = &self.failure {
            text.push_str(&format!("; raising it failed: {failure}"));
        }
        text
    }

    /// An error unless `agents` connections fit in one process (the server and this load
    /// generator each hold one descriptor per agent).
    pub(crate) fn check(&self, agents: usize) -> anyhow::Result<()> {
        let needed = agents as u64 + FD_MARGIN;
        if needed > self.now {
            bail!(
                "{agents} agents need about {needed} file descriptors in the server and in this \
                 process, but the limit is {}; {}",
                self.now,
                self.describe()
            );
        }
        Ok(())
    }
}

/// Raises this process's descriptor limit (which the servers it starts inherit) so that
/// `agents` connections fit, up to the kernel's `fs.nr_open`. Failing is not an error here:
/// the run for a count that does not fit fails with the reason.
pub(crate) fn raise_fd_limit(agents: usize) -> FdLimit {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(error) => {
            return FdLimit {
                before: 0,
                hard_before: 0,
                now: 0,
                failure: Some(format!("getrlimit: {error}")),
            };
        }
    };
    let wanted = agents as u64 + FD_MARGIN;
    let mut limit = FdLimit {
        before: soft,
        hard_before: hard,
        now: soft,
        failure: None,
    };
    if wanted <= soft {
        return limit;
    }
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let target = wanted.min(ceiling);
    // Raising the hard limit needs CAP_SYS_RESOURCE; without it, settle for the hard limit.
    let mut failures = Vec::new();
    match setrlimit(Resource::RLIMIT_NOFILE, target, target.max(hard)) {
        Ok(()) => limit.now = target,
        Err(error) => {
            failures.push(format!("setting the hard limit to {target}: {error}"));
            let soft = target.min(hard);
            match setrlimit(Resource::RLIMIT_NOFILE, soft, hard) {
                Ok(()) => limit.now = soft,
                Err(error) => failures.push(format!("setting the soft limit to {soft}: {error}")),
            }
        }
    }
    if limit.now < wanted && target < wanted {
        failures.push(format!("fs.nr_open caps it at {ceiling}"));
    }
    if !failures.is_empty() {
        limit.failure = Some(failures.join("; "));
    }
    limit
}

/// Resolves on Ctrl-C or SIGTERM, naming which.
pub(crate) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: then this signal never stops the benchmark.
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => "Ctrl-C",
        () = terminate => "SIGTERM",
    }
}
