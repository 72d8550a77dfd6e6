//! The store conformance suite: what every `Store` implementation must do, run here against
//! SQLite in a temporary directory.

use std::time::Duration;

use domain::{ExecutionId, ExecutionState, Limits, MachineId, RunId, RunRequest, Targets};
use store::{
    Change, ExecutionUpdate, Finish, NewExecution, NewMachine, NewRun, SqliteStore, Store,
    StoreError, TokenKind,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn sqlite() -> Result<(tempfile::TempDir, SqliteStore), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("test.db")).await?;
    Ok((dir, store))
}

async fn machine(store: &dyn Store, name: &str) -> Result<MachineId, StoreError> {
    let id = MachineId::new();
    let machine = NewMachine {
        id,
        name: name.to_string(),
        labels: domain::parse_labels("env=prod").unwrap_or_default(),
        hostname: name.to_string(),
        os: "linux".into(),
        arch: "x86_64".into(),
        enrolled_at: 1,
    };
    store
        .enroll_machine(&machine, &format!("hash-{name}"))
        .await?;
    Ok(id)
}

async fn run_on(
    store: &dyn Store,
    machines: &[MachineId],
    deadline: i64,
) -> Result<(RunId, Vec<ExecutionId>), Box<dyn std::error::Error>> {
    run_limited(store, machines, deadline, None, None).await
}

async fn run_limited(
    store: &dyn Store,
    machines: &[MachineId],
    deadline: i64,
    max_concurrency: Option<&str>,
    max_errors: Option<&str>,
) -> Result<(RunId, Vec<ExecutionId>), Box<dyn std::error::Error>> {
    let request = RunRequest {
        max_concurrency: max_concurrency.map(str::to_string),
        max_errors: max_errors.map(str::to_string),
        all: true,
        script: "echo {{who}}".into(),
        parameters: [("who".to_string(), "world".to_string())].into(),
        timeout: Some("90s".into()),
        ..RunRequest::default()
    };
    let (targets, spec) = request.validate(&Limits::default())?;
    let run = NewRun {
        id: RunId::new(),
        created_at: 10,
        targets,
        spec,
    };
    let executions: Vec<NewExecution> = machines
        .iter()
        .map(|machine_id| NewExecution {
            id: ExecutionId::new(),
            machine_id: *machine_id,
            machine_name: "m".into(),
            delivery_deadline: deadline,
            ineligible: None,
        })
        .collect();
    store.create_run(&run, &executions).await?;
    Ok((run.id, executions.iter().map(|e| e.id).collect()))
}

fn update(id: ExecutionId, change: Change) -> ExecutionUpdate {
    ExecutionUpdate {
        id,
        machine: None,
        change,
    }
}

fn delivered(id: ExecutionId, at: i64) -> ExecutionUpdate {
    update(id, Change::Delivered { at })
}

fn finish(id: ExecutionId, state: ExecutionState) -> ExecutionUpdate {
    update(
        id,
        Change::Finished(Box::new(Finish {
            state,
            exit_code: Some(0),
            message: None,
            started_at: Some(20),
            finished_at: 30,
            stdout_bytes: 6,
            stderr_bytes: 0,
            stdout_dropped: 0,
            stderr_dropped: 0,
            stdout_tail: b"world\n".to_vec(),
            stderr_tail: Vec::new(),
            error_code: None,
        })),
    )
}

#[tokio::test]
async fn tokens_and_machines() -> TestResult {
    let (_dir, store) = sqlite().await?;
    store
        .insert_token("admin-hash", TokenKind::Admin, None, 1)
        .await?;
    let token = store.find_token("admin-hash").await?.ok_or("token")?;
    assert_eq!(token.kind, TokenKind::Admin);
    assert!(store.find_token("nope").await?.is_none());

    let id = machine(&store, "web-1").await?;
    assert!(matches!(
        machine(&store, "web-1").await,
        Err(StoreError::NameTaken(_))
    ));
    let token = store
        .find_token("hash-web-1")
        .await?
        .ok_or("machine token")?;
    assert_eq!(token.machine_id, Some(id));
    assert_eq!(
        store.find_machine_by_name("web-1").await?.map(|m| m.id),
        Some(id)
    );
    assert_eq!(store.list_machines().await?.len(), 1);

    store.delete_machine(id, 5).await?;
    // A deleted machine keeps its row, marked, but is no longer listed, and its name is free.
    assert_eq!(
        store.get_machine(id).await?.and_then(|m| m.deleted_at),
        Some(5)
    );
    assert!(store.list_machines().await?.is_empty());
    assert!(store.find_token("hash-web-1").await?.is_none());
    let again = machine(&store, "web-1").await?;
    assert_eq!(
        store.find_machine_by_name("web-1").await?.map(|m| m.id),
        Some(again)
    );
    Ok(())
}

#[tokio::test]
async fn runs_round_trip_with_their_spec() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let b = machine(&store, "b").await?;
    let (run_id, executions) = run_on(&store, &[a, b], 1000).await?;
    let run = store.get_run(run_id).await?.ok_or("run")?;
    assert_eq!(run.total, 2);
    assert_eq!(run.targets, Targets::All);
    assert_eq!(run.spec.timeout, Duration::from_secs(90));
    assert_eq!(run.spec.rendered_script()?, "echo world");
    assert_eq!(run.counts.get(&ExecutionState::Pending), Some(&2));
    assert_eq!(run.finished_at, None);
    assert_eq!(store.run_executions(run_id).await?.len(), 2);
    assert_eq!(store.open_executions(a).await?.len(), 1);
    assert_eq!(
        store.get_execution(executions[0]).await?.map(|e| e.run_id),
        Some(run_id)
    );

    let (newer, _) = run_on(&store, &[a], 1000).await?;
    let listed: Vec<RunId> = store
        .list_runs(None, 10)
        .await?
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![newer, run_id]);
    let older: Vec<RunId> = store
        .list_runs(Some(newer), 10)
        .await?
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(older, vec![run_id]);
    Ok(())
}

#[tokio::test]
async fn states_only_move_forward_and_terminal_states_stay() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let (run_id, executions) = run_on(&store, &[a], 1000).await?;
    let id = executions[0];

    let changed = store.apply(&[delivered(id, 15)], 0).await?.changed;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].state, ExecutionState::Delivered);
    // A repeat changes nothing.
    assert!(
        store
            .apply(&[delivered(id, 16)], 0)
            .await?
            .changed
            .is_empty()
    );
    store
        .apply(&[update(id, Change::Started { at: 20 })], 0)
        .await?;
    // Backwards is refused.
    assert!(
        store
            .apply(&[delivered(id, 21)], 0)
            .await?
            .changed
            .is_empty()
    );
    let done = store
        .apply(&[finish(id, ExecutionState::Succeeded)], 0)
        .await?
        .changed;
    assert_eq!(done[0].state, ExecutionState::Succeeded);
    assert_eq!(done[0].stdout_tail, b"world\n");
    // Terminal never changes.
    assert!(
        store
            .apply(&[finish(id, ExecutionState::Failed)], 0)
            .await?
            .changed
            .is_empty()
    );
    let execution = store.get_execution(id).await?.ok_or("execution")?;
    assert_eq!(execution.state, ExecutionState::Succeeded);
    assert_eq!(
        (
            execution.delivered_at,
            execution.started_at,
            execution.finished_at
        ),
        (Some(15), Some(20), Some(30))
    );
    let run = store.get_run(run_id).await?.ok_or("run")?;
    assert_eq!(run.finished_at, Some(30));
    assert!(store.open_executions(a).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn cancel_skips_pending_and_flags_delivered() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let b = machine(&store, "b").await?;
    let (run_id, executions) = run_on(&store, &[a, b], 1000).await?;
    store.apply(&[delivered(executions[0], 15)], 0).await?;
    let outcome = store.cancel_run(run_id, 50).await?;
    assert_eq!(
        outcome
            .outcome
            .changed
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        vec![executions[1]]
    );
    assert_eq!(
        outcome.to_cancel.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![executions[0]]
    );
    assert!(outcome.to_cancel[0].cancel_requested);
    let run = store.get_run(run_id).await?.ok_or("run")?;
    assert!(run.cancel_requested);
    assert_eq!(run.counts.get(&ExecutionState::Skipped), Some(&1));
    Ok(())
}

#[tokio::test]
async fn deliveries_expire_at_their_deadline_only() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let (_, soon) = run_on(&store, &[a], 100).await?;
    let (_, later) = run_on(&store, &[a], 500).await?;
    assert_eq!(store.next_delivery_deadline().await?, Some(100));
    assert!(store.expire_deliveries(99).await?.changed.is_empty());
    let expired = store.expire_deliveries(100).await?.changed;
    assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), soon);
    assert_eq!(expired[0].state, ExecutionState::DeliveryTimedOut);
    assert_eq!(store.next_delivery_deadline().await?, Some(500));
    store.apply(&[delivered(later[0], 200)], 0).await?;
    assert_eq!(store.next_delivery_deadline().await?, None);
    assert!(store.expire_deliveries(1000).await?.changed.is_empty());
    Ok(())
}

#[tokio::test]
async fn deleting_a_machine_fails_its_open_executions() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let (run_id, executions) = run_on(&store, &[a], 1000).await?;
    let ended = store.delete_machine(a, 70).await?.changed;
    assert_eq!(ended.iter().map(|e| e.id).collect::<Vec<_>>(), executions);
    assert_eq!(ended[0].state, ExecutionState::Failed);
    // The run and its history stay.
    assert!(store.get_run(run_id).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn data_survives_reopening() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("test.db");
    let run_id = {
        let store = SqliteStore::open(&path).await?;
        let a = machine(&store, "a").await?;
        run_on(&store, &[a], 1000).await?.0
    };
    let store = SqliteStore::open(&path).await?;
    assert!(store.get_run(run_id).await?.is_some());
    assert_eq!(store.list_machines().await?.len(), 1);
    Ok(())
}

async fn machines(store: &dyn Store, count: usize) -> Result<Vec<MachineId>, StoreError> {
    let mut ids = Vec::new();
    for index in 0..count {
        ids.push(machine(store, &format!("m{index:03}")).await?);
    }
    Ok(ids)
}

fn ids(records: &[store::ExecutionRecord]) -> Vec<ExecutionId> {
    records.iter().map(|record| record.id).collect()
}

#[tokio::test]
async fn max_concurrency_releases_a_window_at_a_time() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let targets = machines(&store, 5).await?;
    let request = RunRequest {
        all: true,
        script: "true".into(),
        max_concurrency: Some("2".into()),
        ..RunRequest::default()
    };
    let (targets_kind, spec) = request.validate(&Limits::default())?;
    let run = NewRun {
        id: RunId::new(),
        created_at: 10,
        targets: targets_kind,
        spec,
    };
    let new: Vec<NewExecution> = targets
        .iter()
        .map(|machine_id| NewExecution {
            id: ExecutionId::new(),
            machine_id: *machine_id,
            machine_name: "m".into(),
            delivery_deadline: 0,
            ineligible: None,
        })
        .collect();
    let created = store.create_run(&run, &new).await?;
    assert_eq!(ids(&created.released), vec![new[0].id, new[1].id]);
    // The held back are neither open to their machines nor subject to a delivery deadline.
    assert!(store.open_executions(targets[2]).await?.is_empty());
    assert_eq!(store.next_delivery_deadline().await?, Some(10 + 600_000));
    assert_eq!(store.held_back_runs().await?, vec![run.id]);

    // One ends: one more is released, with its deadline counted from now.
    let outcome = store
        .apply(&[finish(new[0].id, ExecutionState::Succeeded)], 100)
        .await?;
    assert_eq!(ids(&outcome.released), vec![new[2].id]);
    assert_eq!(outcome.released[0].delivery_deadline, 100 + 600_000);
    assert!(outcome.finished_runs.is_empty());
    // A failure frees a slot too.
    let outcome = store
        .apply(&[finish(new[1].id, ExecutionState::Failed)], 110)
        .await?;
    assert_eq!(ids(&outcome.released), vec![new[3].id]);
    let outcome = store
        .apply(
            &[
                finish(new[2].id, ExecutionState::Succeeded),
                finish(new[3].id, ExecutionState::Succeeded),
            ],
            120,
        )
        .await?;
    assert_eq!(ids(&outcome.released), vec![new[4].id]);
    let outcome = store
        .apply(&[finish(new[4].id, ExecutionState::Succeeded)], 130)
        .await?;
    assert!(outcome.released.is_empty());
    assert_eq!(outcome.finished_runs, vec![run.id]);
    assert!(store.held_back_runs().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn max_errors_skips_what_was_not_sent() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let targets = machines(&store, 6).await?;
    let (run_id, executions) = run_limited(&store, &targets, 1000, Some("2"), Some("1")).await?;
    store
        .apply(&[finish(executions[0], ExecutionState::Failed)], 20)
        .await?;
    let outcome = store
        .apply(&[finish(executions[1], ExecutionState::TimedOut)], 30)
        .await?;
    // Two errors, one allowed: the three never released are skipped; the released one runs on.
    let skipped: Vec<_> = outcome
        .changed
        .iter()
        .filter(|e| e.state == ExecutionState::Skipped)
        .collect();
    assert_eq!(skipped.len(), 3);
    assert!(outcome.released.is_empty());
    let run = store.get_run(run_id).await?.ok_or("run")?;
    assert!(
        run.stop_reason
            .as_deref()
            .is_some_and(|reason| reason.contains("max_errors")),
        "{:?}",
        run.stop_reason
    );
    assert_eq!(run.counts.get(&ExecutionState::Skipped), Some(&3));
    assert_eq!(run.counts.get(&ExecutionState::Pending), Some(&1));
    Ok(())
}

#[tokio::test]
async fn an_agent_cannot_change_another_machines_execution() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let b = machine(&store, "b").await?;
    let (_, executions) = run_on(&store, &[a], 1000).await?;
    let foreign = ExecutionUpdate {
        id: executions[0],
        machine: Some(b),
        change: Change::Delivered { at: 5 },
    };
    assert!(store.apply(&[foreign], 5).await?.changed.is_empty());
    let own = ExecutionUpdate {
        id: executions[0],
        machine: Some(a),
        change: Change::Delivered { at: 6 },
    };
    assert_eq!(store.apply(&[own], 6).await?.changed.len(), 1);
    Ok(())
}

#[tokio::test]
async fn ineligible_targets_are_failed_executions_not_a_rejected_run() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let targets = machines(&store, 3).await?;
    let request = RunRequest {
        all: true,
        script: "true".into(),
        ..RunRequest::default()
    };
    let (targets_kind, spec) = request.validate(&Limits::default())?;
    let run = NewRun {
        id: RunId::new(),
        created_at: 10,
        targets: targets_kind,
        spec,
    };
    let new: Vec<NewExecution> = targets
        .iter()
        .enumerate()
        .map(|(index, machine_id)| NewExecution {
            id: ExecutionId::new(),
            machine_id: *machine_id,
            machine_name: format!("m{index}"),
            delivery_deadline: 1000,
            ineligible: (index == 1).then(|| "the machine was deleted".to_string()),
        })
        .collect();
    let created = store.create_run(&run, &new).await?;
    assert_eq!(ids(&created.released), vec![new[0].id, new[2].id]);
    assert_eq!(ids(&created.changed), vec![new[1].id]);
    let failed = store.get_execution(new[1].id).await?.ok_or("execution")?;
    assert_eq!(failed.state, ExecutionState::Failed);
    assert_eq!(failed.message.as_deref(), Some("the machine was deleted"));
    assert_eq!(failed.finished_at, Some(10));

    // A run of nothing but ineligible targets is over at once.
    let only = NewRun {
        id: RunId::new(),
        ..run.clone()
    };
    let lone = NewExecution {
        id: ExecutionId::new(),
        ..new[1].clone()
    };
    let created = store.create_run(&only, &[lone]).await?;
    assert_eq!(created.finished_runs, vec![only.id]);
    Ok(())
}

#[tokio::test]
async fn named_run_commands_point_at_their_latest_run() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let b = machine(&store, "b").await?;
    let (_, first_executions) = run_on(&store, &[a], 1000).await?;

    // A run with the spec fields named run commands use, put under a name.
    let request = RunRequest {
        machines: vec![a.to_string()],
        script: "echo {{who}} $token".into(),
        parameters: [("who".to_string(), "world".to_string())].into(),
        protected_parameters: [("token".to_string(), "secret".to_string())].into(),
        run_as_user: Some("nobody".into()),
        ..RunRequest::default()
    };
    let (targets, mut spec) = request.validate(&Limits::default())?;
    spec.replaces = vec![first_executions[0]];
    let run = NewRun {
        id: RunId::new(),
        created_at: 20,
        targets,
        spec,
    };
    let execution = NewExecution {
        id: ExecutionId::new(),
        machine_id: a,
        machine_name: "a".into(),
        delivery_deadline: 1000,
        ineligible: None,
    };
    let command = store::RunCommandRecord {
        machine_id: a,
        name: "deploy".into(),
        run_id: run.id,
        async_execution: false,
        treat_failure_as_deployment_failure: true,
        created_at: 20,
        updated_at: 20,
    };
    let outcome = store
        .put_run_command(&command, &run, std::slice::from_ref(&execution))
        .await?;
    assert_eq!(ids(&outcome.released), vec![execution.id]);
    assert_eq!(
        store.get_run_command(a, "deploy").await?,
        Some(command.clone())
    );
    assert_eq!(store.get_run_command(b, "deploy").await?, None);

    let stored = store.get_run_spec(run.id).await?.ok_or("run")?;
    assert_eq!(stored.spec.protected_parameters["token"], "secret");
    assert_eq!(stored.spec.run_as_user.as_deref(), Some("nobody"));
    assert_eq!(stored.spec.replaces, vec![first_executions[0]]);
    // The run is the command's: while it is open, it is what the next run of the name (in
    // any case) replaces.
    let open = store.open_run_command_executions(a, "DEPLOY").await?;
    assert_eq!(ids(&open), vec![execution.id]);
    assert!(
        store
            .open_run_command_executions(b, "deploy")
            .await?
            .is_empty()
    );

    // Putting the name again points it at the new run and keeps when it was created.
    let again = NewRun {
        id: RunId::new(),
        ..run.clone()
    };
    let replaced = store::RunCommandRecord {
        run_id: again.id,
        async_execution: true,
        updated_at: 30,
        ..command.clone()
    };
    store
        .put_run_command(
            &replaced,
            &again,
            &[NewExecution {
                id: ExecutionId::new(),
                ..execution.clone()
            }],
        )
        .await?;
    let shown = store.get_run_command(a, "deploy").await?.ok_or("command")?;
    assert_eq!(shown.run_id, again.id);
    assert_eq!((shown.created_at, shown.updated_at), (20, 30));
    assert!(shown.async_execution);

    let other_run = NewRun {
        id: RunId::new(),
        ..run.clone()
    };
    let second = store::RunCommandRecord {
        name: "another".into(),
        run_id: other_run.id,
        ..command.clone()
    };
    store
        .put_run_command(
            &second,
            &other_run,
            &[NewExecution {
                id: ExecutionId::new(),
                ..execution.clone()
            }],
        )
        .await?;
    let names: Vec<String> = store
        .list_run_commands(a)
        .await?
        .into_iter()
        .map(|command| command.name)
        .collect();
    assert_eq!(names, vec!["another".to_string(), "deploy".to_string()]);

    assert!(store.delete_run_command(a, "deploy").await?);
    assert!(!store.delete_run_command(a, "deploy").await?);
    assert_eq!(store.get_run_command(a, "deploy").await?, None);
    // The runs stay.
    assert!(store.get_run(again.id).await?.is_some());
    Ok(())
}

/// A run with a secret on `machine`, optionally made for the named run command `name`.
async fn secret_run(
    store: &dyn Store,
    machine: MachineId,
    name: Option<&str>,
) -> Result<(RunId, ExecutionId), Box<dyn std::error::Error>> {
    let request = RunRequest {
        machines: vec![machine.to_string()],
        script: "echo $token".into(),
        protected_parameters: [("token".to_string(), "secret".to_string())].into(),
        ..RunRequest::default()
    };
    let (targets, spec) = request.validate(&Limits::default())?;
    let run = NewRun {
        id: RunId::new(),
        created_at: 10,
        targets,
        spec,
    };
    let execution = NewExecution {
        id: ExecutionId::new(),
        machine_id: machine,
        machine_name: "a".into(),
        delivery_deadline: 1000,
        ineligible: None,
    };
    match name {
        None => {
            store
                .create_run(&run, std::slice::from_ref(&execution))
                .await?;
        }
        Some(name) => {
            let command = store::RunCommandRecord {
                machine_id: machine,
                name: name.into(),
                run_id: run.id,
                async_execution: false,
                treat_failure_as_deployment_failure: false,
                created_at: 10,
                updated_at: 10,
            };
            store
                .put_run_command(&command, &run, std::slice::from_ref(&execution))
                .await?;
        }
    }
    Ok((run.id, execution.id))
}

async fn secret_of(store: &dyn Store, run: RunId) -> Result<String, Box<dyn std::error::Error>> {
    let run = store.get_run_spec(run).await?.ok_or("run")?;
    Ok(run
        .spec
        .protected_parameters
        .get("token")
        .cloned()
        .ok_or("the name is kept")?)
}

#[tokio::test]
async fn protected_values_are_forgotten_once_nothing_can_send_them_again() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;

    // A plain run keeps its secret while it may still be sent, and forgets it at its end.
    let (run, execution) = secret_run(&store, a, None).await?;
    assert_eq!(secret_of(&store, run).await?, "secret");
    store
        .apply(&[finish(execution, ExecutionState::Succeeded)], 40)
        .await?;
    assert_eq!(secret_of(&store, run).await?, "");

    // A canceled run that never went out forgets it too.
    let (run, _) = secret_run(&store, a, None).await?;
    store.cancel_run(run, 40).await?;
    assert_eq!(secret_of(&store, run).await?, "");

    // A named run command's latest run keeps it after its end (a PATCH runs it again) ...
    let (first, execution) = secret_run(&store, a, Some("deploy")).await?;
    store
        .apply(&[finish(execution, ExecutionState::Succeeded)], 40)
        .await?;
    assert_eq!(secret_of(&store, first).await?, "secret");
    // ... until a new run replaces it, which keeps its own ...
    let (second, execution) = secret_run(&store, a, Some("deploy")).await?;
    assert_eq!(secret_of(&store, first).await?, "");
    assert_eq!(secret_of(&store, second).await?, "secret");
    // ... until the name is deleted and the run is over.
    assert!(store.delete_run_command(a, "deploy").await?);
    assert_eq!(
        secret_of(&store, second).await?,
        "secret",
        "still to be sent"
    );
    store
        .apply(&[finish(execution, ExecutionState::Failed)], 50)
        .await?;
    assert_eq!(secret_of(&store, second).await?, "");
    Ok(())
}
