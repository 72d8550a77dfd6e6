//! Runs one `Execute` as a process group of its own: the only module that spawns processes.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use proto::agent::{Execute, Finished, Outcome, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::journal::OutputPaths;

mod interpreter;
mod run_as;

use interpreter::Launch;
use run_as::RunAs;

/// Interpreters an agent looks for on its PATH and reports to the server.
pub(crate) const KNOWN_INTERPRETERS: [&str; 7] =
    ["bash", "sh", "python3", "python", "pwsh", "perl", "node"];

/// Bytes read from a pipe at a time; also the most of one stream held in memory.
const PIPE_BUFFER_BYTES: usize = 64 * 1024;
/// How long the output pipes are drained once the script's process group is gone. Only a
/// process that escaped the group (a detached daemon) can hold them open longer.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
/// How long to wait for a process group to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How often a dying process group is checked during the kill grace: a process we are not the
/// parent of cannot be waited for, only looked for.
const GROUP_CHECK_INTERVAL: Duration = Duration::from_millis(20);
/// The agent's environment variables a script run as another user still gets (with `LC_*`).
const INHERITED_BY_OTHER_USERS: [&str; 5] = ["PATH", "LANG", "LANGUAGE", "TZ", "TERM"];
/// The agent's own credentials, never passed to a script.
const HIDDEN_FROM_SCRIPTS: [&str; 2] = ["FLEETRUN_ENROLL_TOKEN", "FLEETRUN_TOKEN"];
/// Spawning a script file that was just written can fail with ETXTBSY when another thread
/// forked while the file was open for writing; the fork's copy of the descriptor closes at its
/// exec, so a short retry succeeds.
const SPAWN_ATTEMPTS: u32 = 6;

/// Bytes kept and bytes dropped (beyond the output cap) of one stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamTotals {
    pub(crate) kept: u64,
    pub(crate) dropped: u64,
}

/// Told after every append to an output file, with the stream's total kept length.
pub(crate) type OutputObserver = Arc<dyn Fn(Stream, u64) + Send + Sync>;

/// A stable name for why an execution failed without running its script, or for what went
/// wrong after it: `Finished.error_code` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    InterpreterNotFound,
    ScriptDownloadFailed,
    ScriptChecksumMismatch,
    OutputUploadFailed,
    RunAsUserNotFound,
    RunAsNotPermitted,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InterpreterNotFound => "InterpreterNotFound",
            ErrorCode::ScriptDownloadFailed => "ScriptDownloadFailed",
            ErrorCode::ScriptChecksumMismatch => "ScriptChecksumMismatch",
            ErrorCode::OutputUploadFailed => "OutputUploadFailed",
            ErrorCode::RunAsUserNotFound => "RunAsUserNotFound",
            ErrorCode::RunAsNotPermitted => "RunAsNotPermitted",
        }
    }
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExecutionEnd {
    pub(crate) outcome: Outcome,
    pub(crate) exit_code: Option<i32>,
    pub(crate) message: Option<String>,
    pub(crate) error_code: Option<ErrorCode>,
    pub(crate) started_at: Option<i64>,
    pub(crate) finished_at: i64,
    pub(crate) stdout: StreamTotals,
    pub(crate) stderr: StreamTotals,
}

impl ExecutionEnd {
    /// An execution that never started.
    pub(crate) fn not_started(message: String) -> Self {
        Self {
            outcome: Outcome::Failed,
            exit_code: None,
            message: Some(message),
            error_code: None,
            started_at: None,
            finished_at: now_millis(),
            stdout: StreamTotals::default(),
            stderr: StreamTotals::default(),
        }
    }

    /// An execution that failed before its script ran, for a reason with a name.
    pub(crate) fn failed(error_code: ErrorCode, message: String) -> Self {
        Self {
            error_code: Some(error_code),
            ..Self::not_started(message)
        }
    }

    pub(crate) fn into_finished(self, execution_id: uuid::Uuid) -> Finished {
        Finished {
            execution_id,
            outcome: self.outcome,
            exit_code: self.exit_code,
            message: self.message,
            started_at: self.started_at,
            finished_at: self.finished_at,
            stdout_bytes: self.stdout.kept,
            stderr_bytes: self.stderr.kept,
            stdout_dropped: self.stdout.dropped,
            stderr_dropped: self.stderr.dropped,
            error_code: self.error_code.map(|code| code.as_str().to_string()),
        }
    }
}

/// Where a script run as another user had its directory, if it had one.
pub(crate) fn run_as_work_dir(execution_id: uuid::Uuid) -> PathBuf {
    run_as::work_dir_of(execution_id)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_millis() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Where an execution runs and how it is stopped.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// `<state_dir>/work`: each execution gets a fresh directory below it.
    pub(crate) work_root: PathBuf,
    /// The journal files its output is appended to.
    pub(crate) output: OutputPaths,
    /// Between SIGTERM and SIGKILL.
    pub(crate) kill_grace: Duration,
}

/// Which of the stopping reasons ended a script we had to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoppedBecause {
    TimedOut,
    Canceled,
}

/// A script that has been spawned. Its output waits in the pipes until `wait` reads it.
pub(crate) struct RunningScript {
    child: Child,
    group: GroupGuard,
    pid: u32,
    started: Instant,
    started_at: i64,
    timeout: Option<Duration>,
    kill_grace: Duration,
    work_dir: PathBuf,
    output: OutputPaths,
    output_cap: u64,
}

/// Runs `execute` (its inline script) to its end: `start` then `wait`.
#[cfg(test)]
pub(crate) async fn run(
    execute: &Execute,
    placement: &Placement,
    stop: watch::Receiver<bool>,
    observer: OutputObserver,
) -> ExecutionEnd {
    match start(execute, execute.script.clone().into_bytes(), placement).await {
        Ok(script) => script.wait(stop, observer).await,
        Err(end) => end,
    }
}

/// Prepares the work directory, writes `script` (the inline script, or the one downloaded
/// from `script_uri`) into it and spawns it. An execution that cannot start comes back as its
/// (failed) end. Its output waits in the pipes until `wait` reads it, so that the caller can
/// announce the start before any output.
pub(crate) async fn start(
    execute: &Execute,
    script: Vec<u8>,
    placement: &Placement,
) -> Result<RunningScript, ExecutionEnd> {
    let run_as = match &execute.run_as_user {
        None => None,
        Some(user) => {
            let user = user.clone();
            // A user lookup may ask a directory service: it blocks.
            tokio::task::spawn_blocking(move || run_as::resolve(&user))
                .await
                .map_err(|error| {
                    ExecutionEnd::not_started(format!("looking up run_as_user failed: {error}"))
                })??
        }
    };
    // The agent's state directory is private to it: another user's script gets a directory
    // of its own under `run_as::work_root`, which anyone may pass through.
    let work_dir = match &run_as {
        None => placement.work_root.join(execute.execution_id.to_string()),
        Some(_) => {
            let root = tokio::task::spawn_blocking(run_as::work_root)
                .await
                .map_err(io::Error::other)
                .and_then(|root| root)
                .map_err(|error| {
                    ExecutionEnd::not_started(format!(
                        "could not prepare a directory for run_as_user: {error}"
                    ))
                })?;
            root.join(execute.execution_id.to_string())
        }
    };
    let started = prepare_and_spawn(execute, script, placement, &work_dir, run_as.as_ref()).await;
    if started.is_err() {
        remove_work_dir(work_dir).await;
    }
    started
}

async fn prepare_and_spawn(
    execute: &Execute,
    script: Vec<u8>,
    placement: &Placement,
    work_dir: &Path,
    run_as: Option<&RunAs>,
) -> Result<RunningScript, ExecutionEnd> {
    // Interpreters are looked for on the PATH the script will have, as `#!/usr/bin/env` does.
    let search_path = execute
        .env
        .get("PATH")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let launch = interpreter::choose(execute.interpreter.as_deref(), &script, &|name| {
        find_program_on(name, search_path.as_deref())
    })
    .map_err(|message| ExecutionEnd::failed(ErrorCode::InterpreterNotFound, message))?;

    let owner = run_as.map(|run_as| (run_as.uid, run_as.gid));
    let script_path = write_script(
        work_dir.to_path_buf(),
        script,
        launch.script_file_name(),
        owner,
    )
    .await
    .map_err(|error| {
        ExecutionEnd::not_started(format!(
            "could not write the script to {}: {error}",
            work_dir.display()
        ))
    })?;

    let mut command = match launch {
        Launch::Itself => Command::new(&script_path),
        Launch::With { program, args, .. } => {
            let mut command = Command::new(program);
            command.args(args).arg(&script_path);
            command
        }
    };

    let current_dir = match &execute.workdir {
        Some(workdir) => {
            let workdir = PathBuf::from(workdir);
            if !workdir.is_dir() {
                return Err(ExecutionEnd::not_started(format!(
                    "working directory `{}` does not exist on this machine",
                    workdir.display()
                )));
            }
            workdir
        }
        None => work_dir.to_path_buf(),
    };

    match run_as {
        // Another user's script gets the user's identity and a short list of the agent's
        // variables, not the agent's whole environment (which may hold credentials); it
        // leads a session of its own (`run_as::apply`), so it cannot reach the agent's
        // terminal either.
        Some(run_as) => {
            command.env_clear();
            for (name, value) in std::env::vars_os() {
                let inherited = name.to_str().is_some_and(|name| {
                    INHERITED_BY_OTHER_USERS.contains(&name) || name.starts_with("LC_")
                });
                if inherited {
                    command.env(name, value);
                }
            }
            command
                .env("HOME", &run_as.home)
                .env("USER", &run_as.name)
                .env("LOGNAME", &run_as.name)
                .env("SHELL", &run_as.shell);
            run_as::apply(&mut command, run_as);
        }
        // The script leads a process group of its own, so that stopping it stops everything
        // it started.
        None => {
            command.process_group(0);
        }
    }
    for name in HIDDEN_FROM_SCRIPTS {
        command.env_remove(name);
    }
    command
        .current_dir(current_dir)
        // What the operator set explicitly wins over all of the above.
        .envs(&execute.env)
        .env("FLEETRUN_EXECUTION_ID", execute.execution_id.to_string())
        .env("FLEETRUN_RUN_ID", execute.run_id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);

    let child = spawn_with_retry(&mut command).await.map_err(|error| {
        ExecutionEnd::not_started(format!("could not start the script: {error}"))
    })?;
    let started = Instant::now();
    let started_at = now_millis();
    let Some(pid) = child.id() else {
        return Err(ExecutionEnd::not_started(
            "the script exited before its process id could be read".to_string(),
        ));
    };
    let group = GroupGuard::new(pid);

    Ok(RunningScript {
        child,
        group,
        pid,
        started,
        started_at,
        // A zero timeout means none: the server always sends one, so zero is never a request
        // to stop at once.
        timeout: (execute.timeout_ms > 0).then(|| Duration::from_millis(execute.timeout_ms)),
        kill_grace: placement.kill_grace,
        work_dir: work_dir.to_path_buf(),
        output: placement.output.clone(),
        output_cap: execute.output_cap_bytes,
    })
}

impl RunningScript {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn started_at(&self) -> i64 {
        self.started_at
    }

    /// Captures the script's output (telling `observer` after each append), waits for it to
    /// exit, its timeout, or `stop` turning true, stops whatever is left of its process group,
    /// and collects its output totals.
    pub(crate) async fn wait(
        mut self,
        mut stop: watch::Receiver<bool>,
        observer: OutputObserver,
    ) -> ExecutionEnd {
        let (drain_deadline, deadline_watch) = watch::channel(None);
        let stdout = spawn_pump(
            self.child.stdout.take(),
            self.output.stdout.clone(),
            self.output_cap,
            Stream::Stdout,
            observer.clone(),
            deadline_watch.clone(),
        );
        let stderr = spawn_pump(
            self.child.stderr.take(),
            self.output.stderr.clone(),
            self.output_cap,
            Stream::Stderr,
            observer,
            deadline_watch,
        );

        let timeout = self.timeout.map(|timeout| self.started + timeout);
        let ending = tokio::select! {
            status = self.child.wait() => Ok(status),
            () = sleep_until_some(timeout) => Err(StoppedBecause::TimedOut),
            () = stop_requested(&mut stop) => Err(StoppedBecause::Canceled),
        };
        let pgid = self.group.pgid;
        let (status, stopped_because) = match ending {
            Ok(status) => {
                // An execution owns its process group: when the script exits, whatever it
                // left running in the group is stopped too, so a background process holding
                // the pipes cannot keep the execution open forever. A script that means to
                // leave a daemon behind detaches it (setsid, systemd-run).
                if group_alive(pgid) {
                    stop_group(pgid, self.kill_grace).await;
                }
                (status, None)
            }
            Err(because) => {
                let status = terminate(&mut self.child, pgid, self.kill_grace).await;
                (status, Some(because))
            }
        };
        if !group_alive(pgid) {
            self.group.disarm();
        }

        // The group is gone, so the pipes close unless a detached process still holds them.
        drain_deadline.send_replace(Some(Instant::now() + DRAIN_DEADLINE));
        let stdout = collect(stdout).await;
        let stderr = collect(stderr).await;
        remove_work_dir(self.work_dir).await;

        let (outcome, exit_code, message) = match (status, stopped_because) {
            (Err(error), _) => (
                Outcome::Failed,
                None,
                Some(format!("lost track of the script's process: {error}")),
            ),
            (Ok(status), Some(StoppedBecause::TimedOut)) => (
                Outcome::TimedOut,
                exit_code_of(status),
                Some(format!(
                    "the script ran longer than its timeout of {} and was stopped",
                    describe_duration(self.timeout.unwrap_or_default())
                )),
            ),
            (Ok(status), Some(StoppedBecause::Canceled)) => (
                Outcome::Canceled,
                exit_code_of(status),
                Some("canceled while running; the script was stopped".to_string()),
            ),
            (Ok(status), None) => describe_exit(status),
        };
        ExecutionEnd {
            outcome,
            exit_code,
            message,
            error_code: None,
            started_at: Some(self.started_at),
            finished_at: now_millis(),
            stdout,
            stderr,
        }
    }
}

/// Kills a process group on drop unless disarmed: if the task running an execution panics or
/// is dropped, its processes do not outlive it.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn new(pid: u32) -> Self {
        Self {
            pgid: i32::try_from(pid).unwrap_or(i32::MAX),
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `stop` is true; never, if its sender is gone without asking.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// SIGTERM to the whole group, SIGKILL after the grace; returns the main process's status.
async fn terminate(child: &mut Child, pgid: i32, grace: Duration) -> io::Result<ExitStatus> {
    let grace_ends = Instant::now() + grace;
    signal_group(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout_at(grace_ends, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            child.wait().await
        }
    };
    // The main process is gone; the rest of its group gets what is left of the grace.
    if !wait_group_gone(pgid, grace_ends).await {
        signal_group(pgid, Signal::SIGKILL);
        wait_group_gone(pgid, Instant::now() + KILL_WAIT).await;
    }
    status
}

/// Stops every process of a group whose leader we do not (or no longer) wait for: SIGTERM,
/// the grace, SIGKILL. Returns whether the group is gone.
pub(crate) async fn stop_group(pgid: i32, grace: Duration) -> bool {
    signal_group(pgid, Signal::SIGTERM);
    if wait_group_gone(pgid, Instant::now() + grace).await {
        return true;
    }
    signal_group(pgid, Signal::SIGKILL);
    wait_group_gone(pgid, Instant::now() + KILL_WAIT).await
}

fn signal_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(error) => {
            tracing::warn!(%error, pgid, %signal, "could not signal a script's process group")
        }
    }
}

async fn wait_group_gone(pgid: i32, deadline: Instant) -> bool {
    loop {
        if !group_alive(pgid) {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_CHECK_INTERVAL.min(deadline - now)).await;
    }
}

/// Whether any live process remains in a process group. Zombies do not count: an orphan that
/// died is reaped by init, or never is (some container inits do not reap), and it runs nothing
/// either way.
pub(crate) fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => false,
        // EPERM: the group exists and is not ours to signal; count it as alive.
        Err(_) => true,
        // /proc unreadable: assume alive rather than leave processes behind.
        Ok(()) => group_has_live_member(pgid).unwrap_or(true),
    }
}

fn group_has_live_member(pgid: i32) -> io::Result<bool> {
    for entry in fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        // The process may have exited since the listing: that is simply not a member.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, group)) = parse_stat(&stat)
            && group == pgid
            && state != 'Z'
            && state != 'X'
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// State and process group from `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`, where
/// `comm` may itself contain spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(char, i32)> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

fn exit_code_of(status: ExitStatus) -> Option<i32> {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
}

fn describe_exit(status: ExitStatus) -> (Outcome, Option<i32>, Option<String>) {
    match (status.code(), status.signal()) {
        (Some(0), _) => (Outcome::Succeeded, Some(0), None),
        (Some(code), _) => (Outcome::Failed, Some(code), None),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal)
                .map(Signal::as_str)
                .unwrap_or("unknown signal");
            (
                Outcome::Failed,
                Some(128 + signal),
                Some(format!("terminated by signal {signal} ({name})")),
            )
        }
        (None, None) => (
            Outcome::Failed,
            None,
            Some(format!("the script ended without an exit code ({status})")),
        ),
    }
}

fn describe_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Finds a program by name on the agent's PATH, or checks a path given with a slash.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    find_program_on(name, std::env::var_os("PATH").as_deref())
}

/// Finds a program by name on `search_path`, or checks a path given with a slash.
fn find_program_on(name: &str, search_path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    if name.is_empty() {
        return None;
    }
    std::env::split_paths(search_path?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Creates a fresh work directory and writes the script there as `file_name` (mode 0700).
/// With an `owner` (a run-as user), the directory lives in a shared place: it must not exist
/// yet, and directory and script are handed to the owner only once written. Returns the
/// script's path.
async fn write_script(
    work_dir: PathBuf,
    script: Vec<u8>,
    file_name: &'static str,
    owner: Option<(nix::unistd::Uid, nix::unistd::Gid)>,
) -> io::Result<PathBuf> {
    let blocking = tokio::task::spawn_blocking(move || {
        match owner {
            None => {
                if work_dir.exists() {
                    fs::remove_dir_all(&work_dir)?;
                }
                fs::create_dir_all(&work_dir)?;
            }
            // Never reuses what may have been left there.
            Some(_) => fs::DirBuilder::new().mode(0o700).create(&work_dir)?,
        }
        let path = work_dir.join(file_name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&path)?;
        io::Write::write_all(&mut file, &script)?;
        // Handed to the user only once written, the file by its descriptor; the directory's
        // parent is root's and nobody else may write in it, so its path cannot be swapped.
        if let Some((uid, gid)) = owner {
            let (uid, gid) = (Some(uid.as_raw()), Some(gid.as_raw()));
            std::os::unix::fs::fchown(&file, uid, gid)?;
            std::os::unix::fs::chown(&work_dir, uid, gid)?;
        }
        // Closed here, before any spawn, so that this process holds no writer of the file.
        drop(file);
        Ok(path)
    });
    blocking.await.map_err(io::Error::other)?
}

async fn remove_work_dir(work_dir: PathBuf) {
    let removed = tokio::task::spawn_blocking(move || match fs::remove_dir_all(&work_dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err((work_dir, error)),
    })
    .await;
    if let Ok(Err((work_dir, error))) = removed {
        tracing::warn!(%error, dir = %work_dir.display(), "could not remove an execution's work directory");
    }
}

async fn spawn_with_retry(command: &mut Command) -> io::Result<Child> {
    let mut delay = Duration::from_millis(10);
    let mut attempt = 1;
    loop {
        match command.spawn() {
            Err(error)
                if error.raw_os_error() == Some(Errno::ETXTBSY as i32)
                    && attempt < SPAWN_ATTEMPTS =>
            {
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn spawn_pump(
    pipe: Option<impl AsyncRead + Unpin + Send + 'static>,
    path: PathBuf,
    cap: u64,
    stream: Stream,
    observer: OutputObserver,
    drain_deadline: watch::Receiver<Option<Instant>>,
) -> JoinHandle<StreamTotals> {
    tokio::spawn(async move {
        match pipe {
            Some(pipe) => pump(pipe, &path, cap, stream, &observer, drain_deadline).await,
            None => StreamTotals::default(),
        }
    })
}

/// Copies one pipe into its journal file, keeping at most `cap` bytes and counting the rest.
/// Stops at end of file, or at the drain deadline once that is set.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    path: &Path,
    cap: u64,
    stream: Stream,
    observer: &OutputObserver,
    mut drain_deadline: watch::Receiver<Option<Instant>>,
) -> StreamTotals {
    let mut totals = StreamTotals::default();
    let mut file = match tokio::fs::OpenOptions::new().append(true).open(path).await {
        Ok(file) => Some(file),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "cannot open an output file; this stream's output is dropped");
            None
        }
    };
    let mut buffer = vec![0_u8; PIPE_BUFFER_BYTES];
    loop {
        let read = tokio::select! {
            // The deadline comes first so that a process that never stops writing cannot keep
            // the pump going past it.
            biased;
            () = drain_deadline_passed(&mut drain_deadline) => break,
            read = pipe.read(&mut buffer) => read,
        };
        let count = match read {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::warn!(%error, stream = stream.as_str(), "reading a script's output failed");
                break;
            }
        };
        let room = cap.saturating_sub(totals.kept);
        let keep = usize::try_from(room).unwrap_or(usize::MAX).min(count);
        let mut written = 0;
        if keep > 0
            && let Some(open) = file.as_mut()
        {
            let appended = async {
                open.write_all(&buffer[..keep]).await?;
                open.flush().await
            };
            match appended.await {
                Ok(()) => written = keep,
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "writing output failed; the rest of this stream is dropped");
                    file = None;
                }
            }
        }
        if written > 0 {
            totals.kept += written as u64;
            observer(stream, totals.kept);
        }
        totals.dropped += (count - written) as u64;
    }
    totals
}

async fn drain_deadline_passed(deadline: &mut watch::Receiver<Option<Instant>>) {
    // Copied out so that the watch is not borrowed while sleeping.
    let at = match deadline.wait_for(Option::is_some).await {
        Ok(deadline) => *deadline,
        Err(_) => None,
    };
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn collect(pump: JoinHandle<StreamTotals>) -> StreamTotals {
    match pump.await {
        Ok(totals) => totals,
        Err(error) => {
            tracing::error!(%error, "an output pump failed");
            StreamTotals::default()
        }
    }
}

#[cfg(test)]
mod tests;
