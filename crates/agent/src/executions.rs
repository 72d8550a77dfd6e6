//! The executions this agent holds: accepted into the journal, queued for a free slot, run,
//! canceled or forgotten, with each one's progress published for the output shippers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use proto::agent::{Execute, Finished, HeldExecution, HeldPhase, Outcome, Stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use uuid::Uuid;

use crate::executor::{self, ExecutionEnd, OutputObserver, Placement};
use crate::journal::{self, Journal, JournalError, LoadedEntry, OutputPaths, Status};

const INTERRUPTED_MESSAGE: &str =
    "the agent stopped while the script was running; the script's outcome is unknown";
const SHUTDOWN_MESSAGE: &str =
    "the agent was shut down while the script was running; the script was stopped";

/// How executions are run on this machine.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) state_dir: PathBuf,
    pub(crate) max_parallel: usize,
    pub(crate) kill_grace: Duration,
}

/// The script's process, once it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StartedScript {
    pub(crate) pid: u32,
    pub(crate) at: i64,
}

/// Where one execution is: what its shipper sends. Output lengths only grow; `finished` is set
/// once, after the output files are complete.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Progress {
    pub(crate) phase: HeldPhase,
    pub(crate) started: Option<StartedScript>,
    pub(crate) stdout_len: u64,
    pub(crate) stderr_len: u64,
    pub(crate) finished: Option<Finished>,
}

impl Progress {
    fn queued() -> Self {
        Self {
            phase: HeldPhase::Queued,
            started: None,
            stdout_len: 0,
            stderr_len: 0,
            finished: None,
        }
    }

    pub(crate) fn started_at(&self) -> Option<i64> {
        self.started.map(|started| started.at).or_else(|| {
            self.finished
                .as_ref()
                .and_then(|finished| finished.started_at)
        })
    }
}

/// What `accept` did with an `Execute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acceptance {
    /// Written to the journal and queued.
    New,
    /// Already in the journal: never run twice.
    AlreadyHeld,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// The operator canceled it: it finishes as canceled.
    Cancel,
    /// The server no longer wants it: it is stopped and deleted.
    Forget,
    /// The agent is stopping: it finishes as interrupted.
    Shutdown,
}

struct Entry {
    progress: Arc<watch::Sender<Progress>>,
    stop: watch::Sender<bool>,
    stop_reason: Option<StopReason>,
}

impl Entry {
    fn new(progress: Progress) -> Self {
        Self {
            progress: Arc::new(watch::channel(progress).0),
            stop: watch::channel(false).0,
            stop_reason: None,
        }
    }

    fn phase(&self) -> HeldPhase {
        self.progress.borrow().phase
    }
}

#[derive(Default)]
struct State {
    held: HashMap<Uuid, Entry>,
    shutting_down: bool,
}

struct Inner {
    journal: Journal,
    work_root: PathBuf,
    kill_grace: Duration,
    slots: Arc<Semaphore>,
    max_parallel: u32,
    queue: mpsc::UnboundedSender<Uuid>,
    state: Mutex<State>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every critical section is a
        // handful of map operations.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The held executions. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Executions {
    inner: Arc<Inner>,
}

impl Executions {
    /// Loads the journal, settles what the last run of the agent left behind (a script that
    /// was running when the agent died is stopped and finished as interrupted), and starts
    /// running queued executions.
    pub(crate) async fn open(settings: &Settings) -> anyhow::Result<Self> {
        let state_dir = settings.state_dir.clone();
        let (journal, loaded) = blocking(move || {
            let journal = Journal::open(&state_dir)?;
            let loaded = journal.load()?;
            Ok::<_, JournalError>((journal, loaded))
        })
        .await
        .context("loading the journal")?;

        let max_parallel = settings.max_parallel.max(1);
        let (queue, queued) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            journal,
            work_root: settings.state_dir.join("work"),
            kill_grace: settings.kill_grace,
            slots: Arc::new(Semaphore::new(max_parallel)),
            max_parallel: u32::try_from(max_parallel).unwrap_or(u32::MAX),
            queue,
            state: Mutex::new(State::default()),
        });

        let recovered =
            futures_util::future::join_all(loaded.into_iter().map(|entry| recover(&inner, entry)))
                .await;
        for (execution_id, progress) in recovered.into_iter().flatten() {
            let queued = progress.phase == HeldPhase::Queued;
            inner
                .state()
                .held
                .insert(execution_id, Entry::new(progress));
            if queued {
                // The receiver is alive: it is handed to the dispatcher below.
                let _ = inner.queue.send(execution_id);
            }
        }
        tokio::spawn(dispatch(inner.clone(), queued));
        Ok(Self { inner })
    }

    pub(crate) fn max_parallel(&self) -> u32 {
        self.inner.max_parallel
    }

    /// Every held execution and its phase, oldest first, for `Hello`.
    pub(crate) fn held(&self) -> Vec<HeldExecution> {
        let state = self.inner.state();
        let mut held: Vec<HeldExecution> = state
            .held
            .iter()
            .map(|(execution_id, entry)| {
                let progress = entry.progress.borrow();
                HeldExecution {
                    execution_id: *execution_id,
                    phase: progress.phase,
                    started_at: progress.started_at(),
                }
            })
            .collect();
        held.sort_by_key(|held| held.execution_id);
        held
    }

    /// The progress of a held execution and the files its output is in.
    pub(crate) fn subscribe(
        &self,
        execution_id: Uuid,
    ) -> Option<(watch::Receiver<Progress>, OutputPaths)> {
        let state = self.inner.state();
        let entry = state.held.get(&execution_id)?;
        Some((
            entry.progress.subscribe(),
            self.inner.journal.output_paths(execution_id),
        ))
    }

    /// Records an `Execute` durably and queues it, unless its id is already held.
    pub(crate) async fn accept(&self, execute: Execute) -> Result<Acceptance, JournalError> {
        let execution_id = execute.execution_id;
        {
            let state = self.inner.state();
            if state.held.contains_key(&execution_id) {
                return Ok(Acceptance::AlreadyHeld);
            }
            if state.shutting_down {
                return Err(JournalError::Io {
                    context: format!("accepting {execution_id}"),
                    source: std::io::Error::other("the agent is shutting down"),
                });
            }
        }
        let journal = self.inner.journal.clone();
        match blocking(move || journal.create(&execute)).await {
            Ok(()) => {}
            Err(JournalError::AlreadyHeld(_)) => return Ok(Acceptance::AlreadyHeld),
            Err(error) => return Err(error),
        }
        self.inner
            .state()
            .held
            .insert(execution_id, Entry::new(Progress::queued()));
        // The dispatcher lives as long as `inner`, which `self` holds.
        let _ = self.inner.queue.send(execution_id);
        Ok(Acceptance::New)
    }

    /// Cancels a held execution: a queued one finishes as canceled without running, a running
    /// one is stopped and finishes as canceled. Anything else is ignored.
    pub(crate) async fn cancel(&self, execution_id: Uuid) {
        let was_queued = {
            let mut state = self.inner.state();
            let Some(entry) = state.held.get_mut(&execution_id) else {
                return;
            };
            if entry.stop_reason.is_some() {
                return;
            }
            match entry.phase() {
                HeldPhase::Queued => {
                    // Marked first, so that the dispatcher skips it from now on.
                    entry.stop_reason = Some(StopReason::Cancel);
                    true
                }
                HeldPhase::Running => {
                    entry.stop_reason = Some(StopReason::Cancel);
                    entry.stop.send_replace(true);
                    false
                }
                HeldPhase::Finished => return,
            }
        };
        if was_queued {
            let end = ExecutionEnd {
                outcome: Outcome::Canceled,
                message: Some("canceled before it started".to_string()),
                ..ExecutionEnd::not_started(String::new())
            };
            record_finished(&self.inner, execution_id, end).await;
        }
    }

    /// The server no longer wants this execution: stop it if it runs and delete it.
    pub(crate) async fn forget(&self, execution_id: Uuid) {
        let remove_now = {
            let mut state = self.inner.state();
            let Some(entry) = state.held.get_mut(&execution_id) else {
                return;
            };
            if entry.phase() == HeldPhase::Running {
                entry.stop_reason = Some(StopReason::Forget);
                entry.stop.send_replace(true);
                false
            } else {
                state.held.remove(&execution_id);
                true
            }
        };
        if remove_now {
            tracing::info!(%execution_id, "the server no longer holds this execution; forgetting it");
            remove_entry(&self.inner, execution_id).await;
        } else {
            tracing::info!(%execution_id, "the server no longer holds this execution; stopping it");
        }
    }

    /// The server stored the result: delete the journal entry and the work directory.
    pub(crate) async fn acknowledge(&self, execution_id: Uuid) {
        {
            let mut state = self.inner.state();
            match state.held.get(&execution_id).map(Entry::phase) {
                Some(HeldPhase::Finished) => {
                    state.held.remove(&execution_id);
                }
                Some(phase) => {
                    tracing::warn!(%execution_id, ?phase, "ignoring an Ack for an execution that has not finished");
                    return;
                }
                None => return,
            }
        }
        remove_entry(&self.inner, execution_id).await;
    }

    /// Stops every running execution (they finish as interrupted) and waits for them; queued
    /// ones stay in the journal for the next start.
    pub(crate) async fn shutdown(&self) {
        {
            let mut state = self.inner.state();
            state.shutting_down = true;
            for entry in state.held.values_mut() {
                if entry.phase() == HeldPhase::Running && entry.stop_reason.is_none() {
                    entry.stop_reason = Some(StopReason::Shutdown);
                    entry.stop.send_replace(true);
                }
            }
        }
        // Every running execution holds a slot until its result is recorded.
        let _all_slots = self.inner.slots.acquire_many(self.inner.max_parallel).await;
    }
}

/// Runs a blocking journal operation on the blocking pool.
async fn blocking<T: Send + 'static>(
    operation: impl FnOnce() -> Result<T, JournalError> + Send + 'static,
) -> Result<T, JournalError> {
    tokio::task::spawn_blocking(operation)
        .await
        .unwrap_or_else(|error| {
            Err(JournalError::Io {
                context: "a journal operation failed".to_string(),
                source: std::io::Error::other(error.to_string()),
            })
        })
}

/// Turns one loaded journal entry into held progress. A script that was running when the agent
/// died is stopped if it still runs on this boot, and finished as interrupted.
async fn recover(inner: &Inner, entry: LoadedEntry) -> Option<(Uuid, Progress)> {
    let LoadedEntry {
        execution_id,
        mut status,
        stdout_len,
        stderr_len,
    } = entry;
    let mut progress = Progress {
        stdout_len,
        stderr_len,
        ..Progress::queued()
    };
    match status.phase {
        HeldPhase::Queued => {}
        HeldPhase::Finished => {
            progress.phase = HeldPhase::Finished;
            progress.finished = status.finished(execution_id);
        }
        HeldPhase::Running => {
            let same_boot = status.boot_id.is_some() && status.boot_id == journal::boot_id();
            if let (true, Some(pid)) = (same_boot, status.pid) {
                let pgid = i32::try_from(pid).unwrap_or(i32::MAX);
                if executor::group_alive(pgid) {
                    tracing::warn!(%execution_id, pid, "stopping a script left running by the previous agent");
                    executor::stop_group(pgid, inner.kill_grace).await;
                }
            }
            let finished = Finished {
                execution_id,
                outcome: Outcome::Interrupted,
                exit_code: None,
                message: Some(INTERRUPTED_MESSAGE.to_string()),
                started_at: status.started_at,
                finished_at: executor::now_millis(),
                stdout_bytes: stdout_len,
                stderr_bytes: stderr_len,
                stdout_dropped: 0,
                stderr_dropped: 0,
                error_code: None,
            };
            status.set_finished(&finished);
            let journal = inner.journal.clone();
            if let Err(error) = blocking(move || journal.write_status(execution_id, &status)).await
            {
                tracing::warn!(%error, %execution_id, "could not record an interrupted execution");
            }
            let work_dir = inner.work_root.join(execution_id.to_string());
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(work_dir)).await;
            progress.phase = HeldPhase::Finished;
            progress.finished = Some(finished);
        }
    }
    Some((execution_id, progress))
}

/// Starts queued executions in order as slots free up.
async fn dispatch(inner: Arc<Inner>, mut queued: mpsc::UnboundedReceiver<Uuid>) {
    while let Some(execution_id) = queued.recv().await {
        let Ok(permit) = inner.slots.clone().acquire_owned().await else {
            return;
        };
        let begun = {
            let state = inner.state();
            if state.shutting_down {
                return;
            }
            state.held.get(&execution_id).and_then(|entry| {
                let runnable = entry.phase() == HeldPhase::Queued && entry.stop_reason.is_none();
                runnable.then(|| {
                    entry
                        .progress
                        .send_modify(|progress| progress.phase = HeldPhase::Running);
                    (entry.progress.clone(), entry.stop.subscribe())
                })
            })
        };
        // Canceled or forgotten while it waited: the slot goes to the next one.
        let Some((progress, stop)) = begun else {
            continue;
        };
        launch(inner.clone(), execution_id, progress, stop, permit);
    }
}

/// Runs one execution in a task of its own. A panic in it is contained: it is logged and the
/// execution finishes as failed, and the agent goes on.
fn launch(
    inner: Arc<Inner>,
    execution_id: Uuid,
    progress: Arc<watch::Sender<Progress>>,
    stop: watch::Receiver<bool>,
    permit: OwnedSemaphorePermit,
) {
    let task = tokio::spawn(run_one(inner.clone(), execution_id, progress.clone(), stop));
    tokio::spawn(async move {
        if let Err(error) = task.await {
            tracing::error!(%execution_id, %error, "running an execution failed inside the agent");
            let (started_at, stdout_len, stderr_len) = {
                let progress = progress.borrow();
                (
                    progress.started_at(),
                    progress.stdout_len,
                    progress.stderr_len,
                )
            };
            let mut end = ExecutionEnd::not_started(format!(
                "the agent failed while running this script ({error}); it was stopped"
            ));
            // What was captured before the failure is kept and reported.
            end.started_at = started_at;
            end.stdout.kept = stdout_len;
            end.stderr.kept = stderr_len;
            record_finished(&inner, execution_id, end).await;
        }
        // Released only once the result is recorded, so that `shutdown` can wait on the slots.
        drop(permit);
    });
}

async fn run_one(
    inner: Arc<Inner>,
    execution_id: Uuid,
    progress: Arc<watch::Sender<Progress>>,
    stop: watch::Receiver<bool>,
) {
    let journal = inner.journal.clone();
    let execute = match blocking(move || journal.read_execute(execution_id)).await {
        // Lets the tests prove that a panic while running one execution is contained.
        #[cfg(test)]
        Ok(execute) if execute.env.contains_key("AGENT_TEST_PANIC") => {
            panic!("a deliberate panic for a test")
        }
        Ok(execute) => execute,
        Err(error) => {
            let end = ExecutionEnd::not_started(format!(
                "the agent could not read this execution from its journal: {error}"
            ));
            record_finished(&inner, execution_id, end).await;
            return;
        }
    };

    // Recorded as running before the process exists: if the agent dies from here on, the
    // restarted agent reports the execution as interrupted instead of running it again.
    let mut status = Status {
        phase: HeldPhase::Running,
        boot_id: journal::boot_id(),
        ..Status::queued()
    };
    if let Err(error) = write_status(&inner, execution_id, &status).await {
        let end = ExecutionEnd::not_started(format!(
            "the agent could not record the start of this execution in its journal: {error}"
        ));
        record_finished(&inner, execution_id, end).await;
        return;
    }

    let placement = Placement {
        work_root: inner.work_root.clone(),
        output: inner.journal.output_paths(execution_id),
        kill_grace: inner.kill_grace,
    };
    let observed = progress.clone();
    let observer: OutputObserver = Arc::new(move |stream, length| {
        observed.send_modify(|progress| match stream {
            Stream::Stdout => progress.stdout_len = length,
            Stream::Stderr => progress.stderr_len = length,
        });
    });
    let end = match executor::start(&execute, &placement).await {
        Err(end) => end,
        Ok(script) => {
            let started = StartedScript {
                pid: script.pid(),
                at: script.started_at(),
            };
            // Published before the output is read, so that Started goes out before Output.
            progress.send_modify(|progress| progress.started = Some(started));
            status.pid = Some(started.pid);
            status.started_at = Some(started.at);
            if let Err(error) = write_status(&inner, execution_id, &status).await {
                tracing::warn!(%error, %execution_id, "could not record the script's process id");
            }
            script.wait(stop, observer).await
        }
    };
    record_finished(&inner, execution_id, end).await;
}

async fn write_status(
    inner: &Inner,
    execution_id: Uuid,
    status: &Status,
) -> Result<(), JournalError> {
    let journal = inner.journal.clone();
    let status = status.clone();
    blocking(move || journal.write_status(execution_id, &status)).await
}

/// Records how an execution ended, then publishes it; a forgotten execution is deleted instead.
async fn record_finished(inner: &Inner, execution_id: Uuid, mut end: ExecutionEnd) {
    let reason = inner
        .state()
        .held
        .get(&execution_id)
        .and_then(|entry| entry.stop_reason);
    match reason {
        Some(StopReason::Forget) => {
            inner.state().held.remove(&execution_id);
            remove_entry(inner, execution_id).await;
            return;
        }
        Some(StopReason::Shutdown) => {
            end.outcome = Outcome::Interrupted;
            end.message = Some(SHUTDOWN_MESSAGE.to_string());
        }
        Some(StopReason::Cancel) | None => {}
    }
    let finished = end.into_finished(execution_id);
    let mut status = Status::queued();
    status.set_finished(&finished);
    // Written before it is published: once the server sees Finished it may Ack and delete.
    if let Err(error) = write_status(inner, execution_id, &status).await {
        tracing::warn!(%error, %execution_id, "could not record how an execution ended");
    }
    tracing::info!(%execution_id, outcome = ?finished.outcome, exit_code = ?finished.exit_code, "execution finished");
    let state = inner.state();
    if let Some(entry) = state.held.get(&execution_id) {
        entry.progress.send_modify(|progress| {
            progress.phase = HeldPhase::Finished;
            progress.stdout_len = finished.stdout_bytes;
            progress.stderr_len = finished.stderr_bytes;
            progress.finished = Some(finished);
        });
    }
}

async fn remove_entry(inner: &Inner, execution_id: Uuid) {
    let journal = inner.journal.clone();
    if let Err(error) = blocking(move || journal.remove(execution_id)).await {
        tracing::warn!(%error, %execution_id, "could not delete a journal entry");
    }
    let work_dir = inner.work_root.join(execution_id.to_string());
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(work_dir)).await;
}

#[cfg(test)]
mod tests;
