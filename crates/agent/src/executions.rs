//! The executions this agent holds: accepted into the journal, queued for a free slot, run,
//! canceled or forgotten, with each one's progress published for the output shippers.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use proto::agent::{Execute, Finished, HeldExecution, HeldPhase, Outcome, Stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use uuid::Uuid;

use crate::executor::{self, ErrorCode, ExecutionEnd, OutputObserver, Placement};
use crate::journal::{self, Journal, JournalError, LoadedEntry, OutputPaths, Status};
use crate::transfer;

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
    /// For scripts fetched from `script_uri` and output uploaded to blob URIs.
    http: reqwest::Client,
    /// Turns true when the agent shuts down: uploads stop and are resumed at the next start.
    shutdown: watch::Sender<bool>,
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
            http: transfer::client()?,
            shutdown: watch::channel(false).0,
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
        let mut uploading = Vec::new();
        for (execution_id, progress, pending_uploads) in recovered.into_iter().flatten() {
            let queued = progress.phase == HeldPhase::Queued;
            inner
                .state()
                .held
                .insert(execution_id, Entry::new(progress));
            if queued {
                // The receiver is alive: it is handed to the dispatcher below.
                let _ = inner.queue.send(execution_id);
            }
            if pending_uploads {
                uploading.push(execution_id);
            }
        }
        // Scripts that ended before the last agent stopped, with output still to upload.
        for execution_id in uploading {
            tokio::spawn(resume_uploads(inner.clone(), execution_id));
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
        let replaces = execute.replaces.clone();
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
        // The execution it replaces is stopped now, not when this one gets a slot: it may
        // hold the slot this one waits for.
        for replaced in replaces {
            self.cancel(replaced).await;
        }
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
            record_finished(&self.inner, execution_id, canceled_before_start()).await;
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
        self.inner.shutdown.send_replace(true);
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

/// Turns one loaded journal entry into held progress, and whether its output still has to be
/// uploaded. A script that was running when the agent died is stopped if it still runs on
/// this boot, and finished as interrupted; one that had ended but not finished uploading its
/// output stays running until the uploads are done.
async fn recover(inner: &Inner, entry: LoadedEntry) -> Option<(Uuid, Progress, bool)> {
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
        // The script is over (its pid may belong to another process by now): only its uploads
        // remain.
        HeldPhase::Running if status.is_uploading() => {
            progress.phase = HeldPhase::Running;
            progress.started = status
                .pid
                .zip(status.started_at)
                .map(|(pid, at)| StartedScript { pid, at });
            return Some((execution_id, progress, true));
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
    Some((execution_id, progress, false))
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
        let work = run_one(inner.clone(), execution_id, progress.clone(), stop);
        launch(inner.clone(), execution_id, progress, permit, work);
    }
}

/// Finishes the output uploads of a script the previous agent saw end, in a slot of its own.
async fn resume_uploads(inner: Arc<Inner>, execution_id: Uuid) {
    let Ok(permit) = inner.slots.clone().acquire_owned().await else {
        return;
    };
    let begun = {
        let state = inner.state();
        if state.shutting_down {
            return;
        }
        state
            .held
            .get(&execution_id)
            .filter(|entry| entry.phase() == HeldPhase::Running)
            .map(|entry| (entry.progress.clone(), entry.stop.subscribe()))
    };
    let Some((progress, stop)) = begun else {
        return;
    };
    let work = {
        let inner = inner.clone();
        async move {
            let journal = inner.journal.clone();
            let status = match blocking(move || journal.read_status(execution_id)).await {
                Ok(status) => status,
                Err(error) => {
                    // It was just loaded, so this is a damaged disk: report what is known.
                    let mut end = ExecutionEnd::failed(
                        ErrorCode::OutputUploadFailed,
                        format!("the agent could not read this execution's status: {error}"),
                    );
                    end.outcome = Outcome::Interrupted;
                    if let Some(progress) = progress_snapshot(&inner, execution_id) {
                        end.started_at = progress.started_at();
                        end.stdout.kept = progress.stdout_len;
                        end.stderr.kept = progress.stderr_len;
                    }
                    record_finished(&inner, execution_id, end).await;
                    return;
                }
            };
            let journal = inner.journal.clone();
            match blocking(move || journal.read_execute(execution_id)).await {
                Ok(execute) => {
                    tracing::info!(%execution_id, "uploading the output of a script that ended before the agent restarted");
                    upload_outputs(&inner, execution_id, &execute, status, stop).await;
                }
                Err(error) => {
                    let mut status = status;
                    add_upload_failure(
                        &mut status,
                        format!(
                            "the output was not uploaded: the agent could not read this \
                             execution from its journal: {error}"
                        ),
                    );
                    record(&inner, execution_id, status.result(execution_id)).await;
                }
            }
        }
    };
    launch(inner.clone(), execution_id, progress, permit, work);
}

fn progress_snapshot(inner: &Inner, execution_id: Uuid) -> Option<Progress> {
    let state = inner.state();
    let entry = state.held.get(&execution_id)?;
    let progress = entry.progress.borrow().clone();
    Some(progress)
}

/// Runs one execution's `work` in a task of its own. A panic in it is contained: it is logged
/// and the execution finishes as failed, and the agent goes on.
fn launch(
    inner: Arc<Inner>,
    execution_id: Uuid,
    progress: Arc<watch::Sender<Progress>>,
    permit: OwnedSemaphorePermit,
    work: impl Future<Output = ()> + Send + 'static,
) {
    let task = tokio::spawn(work);
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
    mut stop: watch::Receiver<bool>,
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

    // A replacement canceled while it waits for what it replaces never starts.
    if !execute.replaces.is_empty() {
        let waiting = wait_until_gone(&inner, &execute.replaces);
        tokio::select! {
            () = waiting => {}
            () = stop_requested(&mut stop) => {
                record_finished(&inner, execution_id, canceled_before_start()).await;
                return;
            }
        }
    }

    // Recorded as running before the script is fetched or the process exists: if the agent
    // dies from here on, the restarted agent reports the execution as interrupted instead of
    // running it again.
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

    let script = match &execute.script_uri {
        None => execute.script.clone().into_bytes(),
        Some(uri) => {
            let downloading = transfer::download_script(
                &inner.http,
                uri,
                execute.script_sha256.as_deref(),
                execute.max_script_bytes,
            );
            let downloaded = tokio::select! {
                downloaded = downloading => downloaded,
                () = stop_requested(&mut stop) => {
                    record_finished(&inner, execution_id, canceled_before_start()).await;
                    return;
                }
            };
            match downloaded {
                Ok(script) => script,
                Err(failure) => {
                    tracing::warn!(%execution_id, message = %failure.message, "could not fetch the script");
                    let end = ExecutionEnd::failed(failure.code, failure.message);
                    record_finished(&inner, execution_id, end).await;
                    return;
                }
            }
        }
    };

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
    let end = match executor::start(&execute, script, &placement).await {
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
            script.wait(stop.clone(), observer).await
        }
    };

    // Output is uploaded only for a script that ran, and not when the agent stops or the
    // server no longer wants the execution.
    let mut pending_uploads = Vec::new();
    if end.started_at.is_some() {
        if execute.output_blob_uri.is_some() {
            pending_uploads.push(Stream::Stdout);
        }
        if execute.error_blob_uri.is_some() {
            pending_uploads.push(Stream::Stderr);
        }
    }
    let stopping = matches!(
        stop_reason(&inner, execution_id),
        Some(StopReason::Forget | StopReason::Shutdown)
    );
    if pending_uploads.is_empty() || stopping {
        record_finished(&inner, execution_id, end).await;
        return;
    }
    // The end is recorded before the uploads, so that an agent that dies while uploading
    // neither runs the script again nor loses how it ended: the restarted agent finishes the
    // uploads left.
    status.set_result(&end.into_finished(execution_id));
    status.pending_uploads = pending_uploads;
    if let Err(error) = write_status(&inner, execution_id, &status).await {
        tracing::warn!(%error, %execution_id, "could not record the end of a script before uploading its output");
    }
    upload_outputs(&inner, execution_id, &execute, status, stop).await;
}

/// Waits until the executions `replaced` (canceled when their replacement was accepted)
/// have ended, their process groups gone. Those this agent does not hold are gone already.
async fn wait_until_gone(inner: &Inner, replaced: &[Uuid]) {
    let watches: Vec<_> = {
        let state = inner.state();
        replaced
            .iter()
            .filter_map(|id| state.held.get(id))
            .map(|entry| entry.progress.subscribe())
            .collect()
    };
    for mut progress in watches {
        // An error means the entry is gone altogether, which is just as good.
        let _ = progress
            .wait_for(|progress| progress.phase == HeldPhase::Finished)
            .await;
    }
}

/// Uploads each stream in `status.pending_uploads` to its blob URI, recording each one done in
/// the journal, then finishes the execution. A failed upload does not change the outcome: it
/// sets `OutputUploadFailed` and says why in the message. Returns early, leaving the rest to
/// the next start, when the agent shuts down.
async fn upload_outputs(
    inner: &Inner,
    execution_id: Uuid,
    execute: &Execute,
    mut status: Status,
    mut stop: watch::Receiver<bool>,
) {
    let paths = inner.journal.output_paths(execution_id);
    while let Some(&stream) = status.pending_uploads.first() {
        let (uri, path, length) = match stream {
            Stream::Stdout => (&execute.output_blob_uri, &paths.stdout, status.stdout_bytes),
            Stream::Stderr => (&execute.error_blob_uri, &paths.stderr, status.stderr_bytes),
        };
        if let Some(uri) = uri {
            let uploading = transfer::upload_file(&inner.http, uri, path, length);
            let uploaded = tokio::select! {
                uploaded = uploading => uploaded,
                reason = abandoned(inner, execution_id, &mut stop) => {
                    if reason == StopReason::Forget {
                        record(inner, execution_id, status.result(execution_id)).await;
                    }
                    return;
                }
            };
            if let Err(reason) = uploaded {
                let failure = format!(
                    "uploading {} to {}: {reason}",
                    stream.as_str(),
                    transfer::redact(uri)
                );
                tracing::warn!(%execution_id, "{failure}");
                add_upload_failure(&mut status, failure);
            }
        }
        status.pending_uploads.remove(0);
        if !status.pending_uploads.is_empty()
            && let Err(error) = write_status(inner, execution_id, &status).await
        {
            tracing::warn!(%error, %execution_id, "could not record an output upload");
        }
    }
    record(inner, execution_id, status.result(execution_id)).await;
}

/// Adds a failed upload to the result: the outcome stays, the message says what failed.
fn add_upload_failure(status: &mut Status, failure: String) {
    status.message = Some(match status.message.take() {
        Some(message) => format!("{message}; {failure}"),
        None => failure,
    });
    status
        .error_code
        .get_or_insert_with(|| ErrorCode::OutputUploadFailed.as_str().to_string());
}

/// Resolves when an uploading execution must stop: the agent shuts down or the server forgot
/// it. A cancel does not stop it: the script is already over.
async fn abandoned(
    inner: &Inner,
    execution_id: Uuid,
    stop: &mut watch::Receiver<bool>,
) -> StopReason {
    let forgotten = async {
        // Each turn follows a change of `stop`, which happens once per cancel, forget or
        // shutdown.
        loop {
            if stop_reason(inner, execution_id) == Some(StopReason::Forget) {
                return;
            }
            if stop.changed().await.is_err() {
                // Nothing can forget it any more.
                return std::future::pending().await;
            }
        }
    };
    let mut shutdown = inner.shutdown.subscribe();
    tokio::select! {
        () = forgotten => StopReason::Forget,
        _ = shutdown.wait_for(|down| *down) => StopReason::Shutdown,
    }
}

/// Resolves once `stop` is true; never, if its sender is gone without asking.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn stop_reason(inner: &Inner, execution_id: Uuid) -> Option<StopReason> {
    inner
        .state()
        .held
        .get(&execution_id)
        .and_then(|entry| entry.stop_reason)
}

fn canceled_before_start() -> ExecutionEnd {
    ExecutionEnd {
        outcome: Outcome::Canceled,
        message: Some("canceled before it started".to_string()),
        ..ExecutionEnd::not_started(String::new())
    }
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
/// One the agent stopped because it is shutting down is interrupted.
async fn record_finished(inner: &Inner, execution_id: Uuid, mut end: ExecutionEnd) {
    if stop_reason(inner, execution_id) == Some(StopReason::Shutdown) {
        end.outcome = Outcome::Interrupted;
        end.message = Some(SHUTDOWN_MESSAGE.to_string());
    }
    record(inner, execution_id, end.into_finished(execution_id)).await;
}

/// Records a result in the journal, then publishes it; a forgotten execution is deleted
/// instead.
async fn record(inner: &Inner, execution_id: Uuid, finished: Finished) {
    if stop_reason(inner, execution_id) == Some(StopReason::Forget) {
        inner.state().held.remove(&execution_id);
        remove_entry(inner, execution_id).await;
        return;
    }
    let mut status = Status::queued();
    status.set_finished(&finished);
    // Written before it is published: once the server sees Finished it may Ack and delete.
    if let Err(error) = write_status(inner, execution_id, &status).await {
        tracing::warn!(%error, %execution_id, "could not record how an execution ended");
    }
    tracing::info!(%execution_id, outcome = ?finished.outcome, exit_code = ?finished.exit_code, error_code = ?finished.error_code, "execution finished");
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
    let work_dirs = [
        inner.work_root.join(execution_id.to_string()),
        executor::run_as_work_dir(execution_id),
    ];
    let _ = tokio::task::spawn_blocking(move || {
        for work_dir in work_dirs {
            let _ = std::fs::remove_dir_all(work_dir);
        }
    })
    .await;
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transfer_tests;
