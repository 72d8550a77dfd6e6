//! The store conformance suite: what every `Store` implementation must do, run here against
//! SQLite in a temporary directory.

use std::time::Duration;

use domain::{ExecutionId, ExecutionState, Limits, MachineId, RunId, RunRequest, Targets};
use store::{
    ExecutionUpdate, Finish, NewExecution, NewMachine, NewRun, SqliteStore, Store, StoreError,
    TokenKind,
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
    let request = RunRequest {
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
        })
        .collect();
    store.create_run(&run, &executions).await?;
    Ok((run.id, executions.iter().map(|e| e.id).collect()))
}

fn finish(id: ExecutionId, state: ExecutionState) -> ExecutionUpdate {
    ExecutionUpdate::Finished(Box::new(Finish {
        id,
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
    }))
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
    assert!(store.get_machine(id).await?.is_none());
    assert!(store.find_token("hash-web-1").await?.is_none());
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

    let changed = store
        .apply(&[ExecutionUpdate::Delivered { id, at: 15 }])
        .await?;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].state, ExecutionState::Delivered);
    // A repeat changes nothing.
    assert!(
        store
            .apply(&[ExecutionUpdate::Delivered { id, at: 16 }])
            .await?
            .is_empty()
    );
    store
        .apply(&[ExecutionUpdate::Started { id, at: 20 }])
        .await?;
    // Backwards is refused.
    assert!(
        store
            .apply(&[ExecutionUpdate::Delivered { id, at: 21 }])
            .await?
            .is_empty()
    );
    let done = store
        .apply(&[finish(id, ExecutionState::Succeeded)])
        .await?;
    assert_eq!(done[0].state, ExecutionState::Succeeded);
    assert_eq!(done[0].stdout_tail, b"world\n");
    // Terminal never changes.
    assert!(
        store
            .apply(&[finish(id, ExecutionState::Failed)])
            .await?
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
    store
        .apply(&[ExecutionUpdate::Delivered {
            id: executions[0],
            at: 15,
        }])
        .await?;
    let outcome = store.cancel_run(run_id, 50).await?;
    assert_eq!(
        outcome.skipped.iter().map(|e| e.id).collect::<Vec<_>>(),
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
    assert!(store.expire_deliveries(99).await?.is_empty());
    let expired = store.expire_deliveries(100).await?;
    assert_eq!(expired.iter().map(|e| e.id).collect::<Vec<_>>(), soon);
    assert_eq!(expired[0].state, ExecutionState::DeliveryTimedOut);
    assert_eq!(store.next_delivery_deadline().await?, Some(500));
    store
        .apply(&[ExecutionUpdate::Delivered {
            id: later[0],
            at: 200,
        }])
        .await?;
    assert_eq!(store.next_delivery_deadline().await?, None);
    assert!(store.expire_deliveries(1000).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn deleting_a_machine_fails_its_open_executions() -> TestResult {
    let (_dir, store) = sqlite().await?;
    let a = machine(&store, "a").await?;
    let (run_id, executions) = run_on(&store, &[a], 1000).await?;
    let ended = store.delete_machine(a, 70).await?;
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
