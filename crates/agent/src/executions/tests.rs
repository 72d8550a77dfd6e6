//! Held executions: the parallelism limit, cancel, at-most-once, acknowledgement, and what a
//! restarted agent makes of its journal.

use std::time::Duration;

use super::*;
use crate::test_support::{eventually, execute, live_group_members, within};

const LIMIT: Duration = Duration::from_secs(20);

fn settings(state_dir: &std::path::Path, max_parallel: usize) -> Settings {
    Settings {
        state_dir: state_dir.to_path_buf(),
        max_parallel,
        kill_grace: Duration::from_millis(500),
    }
}

async fn open(state_dir: &std::path::Path, max_parallel: usize) -> Executions {
    within(
        LIMIT,
        "opening",
        Executions::open(&settings(state_dir, max_parallel)),
    )
    .await
    .expect("opens")
}

async fn wait_for(
    executions: &Executions,
    execution_id: Uuid,
    what: &str,
    condition: impl FnMut(&Progress) -> bool,
) -> Progress {
    let (mut progress, _) = executions.subscribe(execution_id).expect("held");
    within(LIMIT, what, progress.wait_for(condition))
        .await
        .expect("still held")
        .clone()
}

async fn finished(executions: &Executions, execution_id: Uuid) -> Finished {
    wait_for(executions, execution_id, "finishing", |progress| {
        progress.finished.is_some()
    })
    .await
    .finished
    .expect("finished")
}

fn journal(state_dir: &std::path::Path) -> Journal {
    Journal::open(state_dir).expect("journal opens")
}

#[tokio::test]
async fn at_most_max_parallel_run_at_once_and_none_is_dropped() {
    let state = tempfile::tempdir().expect("tempdir");
    let log = state.path().join("log");
    let executions = open(state.path(), 2).await;
    let mut ids = Vec::new();
    for index in 0..6 {
        let mut work = execute("echo start >> \"$LOG\"; sleep 0.2; echo end >> \"$LOG\"");
        work.env
            .insert("LOG".to_string(), log.display().to_string());
        work.env.insert("INDEX".to_string(), index.to_string());
        ids.push(work.execution_id);
        assert_eq!(
            executions.accept(work).await.expect("accepted"),
            Acceptance::New
        );
    }
    for id in &ids {
        assert_eq!(finished(&executions, *id).await.outcome, Outcome::Succeeded);
    }
    let log = std::fs::read_to_string(log).expect("log written");
    let (mut running, mut most) = (0, 0);
    for line in log.lines() {
        running += if line == "start" { 1 } else { -1 };
        most = most.max(running);
    }
    assert_eq!(log.lines().count(), 12, "every execution ran once:\n{log}");
    assert_eq!(most, 2, "two at a time, never more:\n{log}");
}

#[tokio::test]
async fn cancel_finishes_queued_and_running_executions() {
    let state = tempfile::tempdir().expect("tempdir");
    let marker = state.path().join("marker");
    let executions = open(state.path(), 1).await;
    let running = execute("echo ready; sleep 300");
    let mut queued = execute("touch \"$MARKER\"");
    queued
        .env
        .insert("MARKER".to_string(), marker.display().to_string());
    let (running_id, queued_id) = (running.execution_id, queued.execution_id);
    executions.accept(running).await.expect("accepted");
    executions.accept(queued).await.expect("accepted");
    let progress = wait_for(&executions, running_id, "output", |progress| {
        progress.stdout_len > 0
    })
    .await;
    let pgid = i32::try_from(progress.started.expect("started").pid).expect("pid fits");
    assert_eq!(
        executions
            .held()
            .iter()
            .map(|held| held.phase)
            .collect::<Vec<_>>(),
        vec![HeldPhase::Running, HeldPhase::Queued]
    );

    executions.cancel(queued_id).await;
    let canceled = finished(&executions, queued_id).await;
    assert_eq!(canceled.outcome, Outcome::Canceled);
    assert_eq!(canceled.started_at, None);
    assert_eq!(
        canceled.message.as_deref(),
        Some("canceled before it started")
    );

    executions.cancel(running_id).await;
    let canceled = finished(&executions, running_id).await;
    assert_eq!(canceled.outcome, Outcome::Canceled);
    assert_eq!(canceled.stdout_bytes, 6);
    assert!(canceled.started_at.is_some());
    eventually(LIMIT, "the script is gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;

    // Cancel is recorded in the journal, and the queued script never ran.
    let status = journal(state.path())
        .read_status(queued_id)
        .expect("status");
    assert_eq!(
        (status.phase, status.outcome),
        (HeldPhase::Finished, Some(Outcome::Canceled))
    );
    assert!(!marker.exists());
    executions.cancel(Uuid::now_v7()).await;
}

#[tokio::test]
async fn an_execution_is_run_at_most_once_and_forgotten_on_ack() {
    let state = tempfile::tempdir().expect("tempdir");
    let count = state.path().join("count");
    let executions = open(state.path(), 4).await;
    let mut once = execute("echo ran >> \"$COUNT\"");
    once.env
        .insert("COUNT".to_string(), count.display().to_string());
    let id = once.execution_id;
    assert_eq!(
        executions.accept(once.clone()).await.expect("accepted"),
        Acceptance::New
    );
    assert_eq!(
        executions.accept(once.clone()).await.expect("accepted"),
        Acceptance::AlreadyHeld
    );
    assert_eq!(finished(&executions, id).await.outcome, Outcome::Succeeded);
    assert_eq!(
        executions.accept(once.clone()).await.expect("accepted"),
        Acceptance::AlreadyHeld
    );
    // A restarted agent remembers it too.
    drop(executions);
    let executions = open(state.path(), 4).await;
    assert_eq!(
        executions.accept(once).await.expect("accepted"),
        Acceptance::AlreadyHeld
    );
    assert_eq!(std::fs::read_to_string(&count).expect("ran"), "ran\n");

    executions.acknowledge(id).await;
    assert!(executions.subscribe(id).is_none());
    assert!(executions.held().is_empty());
    assert!(!state.path().join("journal").join(id.to_string()).exists());
}

#[tokio::test]
async fn an_ack_before_the_end_is_ignored() {
    let state = tempfile::tempdir().expect("tempdir");
    let executions = open(state.path(), 1).await;
    let work = execute("echo ready; sleep 300");
    let id = work.execution_id;
    executions.accept(work).await.expect("accepted");
    wait_for(&executions, id, "output", |progress| {
        progress.stdout_len > 0
    })
    .await;
    executions.acknowledge(id).await;
    assert!(executions.subscribe(id).is_some());
    executions.cancel(id).await;
    finished(&executions, id).await;
}

#[tokio::test]
async fn forgetting_a_running_execution_stops_and_deletes_it() {
    let state = tempfile::tempdir().expect("tempdir");
    let executions = open(state.path(), 1).await;
    let work = execute("echo ready; sleep 300");
    let id = work.execution_id;
    executions.accept(work).await.expect("accepted");
    let progress = wait_for(&executions, id, "output", |progress| {
        progress.stdout_len > 0
    })
    .await;
    let pgid = i32::try_from(progress.started.expect("started").pid).expect("pid fits");
    let (mut watching, _) = executions.subscribe(id).expect("held");

    executions.forget(id).await;
    // The progress channel closes when the execution is deleted.
    within(LIMIT, "deletion", async {
        while watching.changed().await.is_ok() {}
    })
    .await;
    assert!(executions.held().is_empty());
    assert!(!state.path().join("journal").join(id.to_string()).exists());
    eventually(LIMIT, "the script is gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_panic_while_running_fails_only_that_execution() {
    let state = tempfile::tempdir().expect("tempdir");
    let executions = open(state.path(), 1).await;
    let mut doomed = execute("echo never");
    doomed
        .env
        .insert("AGENT_TEST_PANIC".to_string(), "1".to_string());
    let fine = execute("echo fine");
    let (doomed_id, fine_id) = (doomed.execution_id, fine.execution_id);
    executions.accept(doomed).await.expect("accepted");
    executions.accept(fine).await.expect("accepted");

    let failed = finished(&executions, doomed_id).await;
    assert_eq!(failed.outcome, Outcome::Failed);
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|message| message.contains("the agent failed")),
        "{:?}",
        failed.message
    );
    assert_eq!(
        finished(&executions, fine_id).await.outcome,
        Outcome::Succeeded
    );
}

#[tokio::test]
async fn shutdown_interrupts_running_executions_and_keeps_queued_ones() {
    let state = tempfile::tempdir().expect("tempdir");
    let executions = open(state.path(), 1).await;
    let running = execute("echo ready; sleep 300");
    let queued = execute("echo later");
    let (running_id, queued_id) = (running.execution_id, queued.execution_id);
    executions.accept(running).await.expect("accepted");
    executions.accept(queued).await.expect("accepted");
    wait_for(&executions, running_id, "output", |progress| {
        progress.stdout_len > 0
    })
    .await;

    within(LIMIT, "shutdown", executions.shutdown()).await;
    let journal = journal(state.path());
    let status = journal.read_status(running_id).expect("status");
    assert_eq!(
        (status.phase, status.outcome),
        (HeldPhase::Finished, Some(Outcome::Interrupted))
    );
    assert_eq!(status.message.as_deref(), Some(SHUTDOWN_MESSAGE));
    assert_eq!(
        journal.read_status(queued_id).expect("status").phase,
        HeldPhase::Queued
    );
}

/// A process group standing in for a script that outlived the agent that started it.
fn orphan_script() -> (std::process::Child, u32) {
    use std::os::unix::process::CommandExt as _;
    let child = std::process::Command::new("sh")
        .args(["-c", "sleep 300 & sleep 300"])
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let pid = child.id();
    (child, pid)
}

#[tokio::test]
async fn a_restart_settles_what_the_journal_holds() {
    let state = tempfile::tempdir().expect("tempdir");
    let journal = journal(state.path());

    let queued = execute("echo from the queue");
    journal.create(&queued).expect("created");

    // Running on this boot when the agent died: stopped, and interrupted.
    let died_running = execute("sleep 300");
    journal.create(&died_running).expect("created");
    let (mut orphan, orphan_pid) = orphan_script();
    std::fs::write(
        journal.output_paths(died_running.execution_id).stdout,
        b"partial",
    )
    .expect("output");
    let running = Status {
        phase: HeldPhase::Running,
        pid: Some(orphan_pid),
        started_at: Some(1_000),
        boot_id: journal::boot_id(),
        ..Status::queued()
    };
    journal
        .write_status(died_running.execution_id, &running)
        .expect("written");

    // Running on an earlier boot: its pid means nothing now and must not be signalled.
    let other_boot = execute("sleep 300");
    journal.create(&other_boot).expect("created");
    let (mut bystander, bystander_pid) = orphan_script();
    let stale = Status {
        pid: Some(bystander_pid),
        boot_id: Some("an-earlier-boot".to_string()),
        ..running.clone()
    };
    journal
        .write_status(other_boot.execution_id, &stale)
        .expect("written");

    // Finished and waiting for its Ack: kept as it is.
    let done = execute("true");
    journal.create(&done).expect("created");
    let mut finished_status = Status::queued();
    finished_status.set_finished(&Finished {
        execution_id: done.execution_id,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        message: None,
        started_at: Some(5),
        finished_at: 6,
        stdout_bytes: 0,
        stderr_bytes: 0,
        stdout_dropped: 0,
        stderr_dropped: 0,
        error_code: None,
    });
    journal
        .write_status(done.execution_id, &finished_status)
        .expect("written");

    let executions = open(state.path(), 2).await;

    let interrupted = finished(&executions, died_running.execution_id).await;
    assert_eq!(interrupted.outcome, Outcome::Interrupted);
    assert_eq!(interrupted.message.as_deref(), Some(INTERRUPTED_MESSAGE));
    assert_eq!(
        (interrupted.started_at, interrupted.stdout_bytes),
        (Some(1_000), 7)
    );
    let orphan_pgid = i32::try_from(orphan_pid).expect("pid fits");
    assert!(
        live_group_members(orphan_pgid).is_empty(),
        "the orphaned script was stopped"
    );
    let _ = orphan.wait();

    let stale = finished(&executions, other_boot.execution_id).await;
    assert_eq!(stale.outcome, Outcome::Interrupted);
    let bystander_pgid = i32::try_from(bystander_pid).expect("pid fits");
    assert!(
        !live_group_members(bystander_pgid).is_empty(),
        "another boot's pid is left alone"
    );
    let _ = killpg(bystander_pgid);
    let _ = bystander.wait();

    let kept = finished(&executions, done.execution_id).await;
    assert_eq!(
        (kept.outcome, kept.started_at, kept.finished_at),
        (Outcome::Succeeded, Some(5), 6)
    );

    let ran = finished(&executions, queued.execution_id).await;
    assert_eq!(ran.outcome, Outcome::Succeeded);
    assert_eq!(
        std::fs::read(journal.output_paths(queued.execution_id).stdout).expect("output"),
        b"from the queue\n"
    );

    let phases: Vec<(Uuid, HeldPhase)> = executions
        .held()
        .into_iter()
        .map(|held| (held.execution_id, held.phase))
        .collect();
    assert_eq!(phases.len(), 4);
    assert!(
        phases
            .iter()
            .all(|(_, phase)| *phase == HeldPhase::Finished)
    );
}

fn killpg(pgid: i32) -> nix::Result<()> {
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    )
}
