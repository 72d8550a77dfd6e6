//! The dispatcher: turns released executions into deliveries to connected agents, publishes
//! what changed, cancels, and ends executions whose machine did not take them before their
//! delivery deadline.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use domain::{ExecutionId, RunId};
use proto::agent::{Execute, ServerMessage};
use store::{ExecutionRecord, Outcome, RunRecord};

use crate::events::Event;
use crate::{AppState, now_millis};

/// The message that asks an agent to run one execution of `run`.
pub(crate) fn execute_message(
    state: &AppState,
    run: &RunRecord,
    execution_id: ExecutionId,
) -> Option<ServerMessage> {
    // Validation proved the script renders; a failure here means stored data changed under us.
    // A script fetched from a URI is not templated: its parameters come as environment
    // variables only.
    let script = match run.spec.rendered_script() {
        Ok(script) => script,
        Err(error) => {
            tracing::error!(run = %run.id, %error, "stored run does not render");
            return None;
        }
    };
    // Parameters are exported as environment variables of the same name; an explicit
    // environment variable of the same name wins.
    let mut env: BTreeMap<String, String> = run.spec.all_parameters();
    env.extend(run.spec.env.clone());
    Some(ServerMessage::Execute(Box::new(Execute {
        execution_id: execution_id.as_uuid(),
        run_id: run.id.as_uuid(),
        script,
        interpreter: run
            .spec
            .interpreter
            .as_ref()
            .map(|i| i.as_str().to_string()),
        env,
        workdir: run.spec.workdir.clone(),
        timeout_ms: run.spec.timeout.as_millis() as u64,
        output_cap_bytes: state.limits.output_cap_bytes,
        script_uri: run.spec.script_uri.clone(),
        script_sha256: run.spec.script_sha256.clone(),
        max_script_bytes: state.limits.max_script_bytes,
        output_blob_uri: run.spec.output_blob_uri.clone(),
        error_blob_uri: run.spec.error_blob_uri.clone(),
        run_as_user: run.spec.run_as_user.clone(),
        replaces: run.spec.replaces.iter().map(|id| id.as_uuid()).collect(),
    })))
}

/// Acts on what a write did: tells waiters, and sends released executions to their agents.
pub(crate) fn settled(state: &AppState, outcome: Outcome) {
    for execution in &outcome.changed {
        state.events.publish(Event::Execution {
            run_id: execution.run_id,
            execution_id: execution.id,
            state: execution.state,
            exit_code: execution.exit_code,
        });
    }
    for run_id in outcome.finished_runs {
        state.events.publish(Event::RunDone { run_id });
    }
    if !outcome.released.is_empty() {
        // Released executions bring delivery deadlines of their own.
        state.deadlines_changed.notify_one();
        // Delivery waits on agents' queues; it must never hold up the caller (the group
        // commit writer among them).
        tokio::spawn(deliver(state.clone(), outcome.released));
    }
}

/// Pushes executions to the agents that are connected now. Agents that are not get theirs when
/// they connect.
async fn deliver(state: AppState, executions: Vec<ExecutionRecord>) {
    let mut runs: HashMap<RunId, Option<RunRecord>> = HashMap::new();
    for execution in executions {
        let Some(link) = state.gateway.link(execution.machine_id) else {
            continue;
        };
        let run = match runs.entry(execution.run_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(match state.store.get_run_spec(execution.run_id).await {
                Ok(run) => run,
                Err(error) => {
                    tracing::error!(run = %execution.run_id, %error, "reading a run to deliver it");
                    None
                }
            }),
        };
        let Some(run) = run else {
            continue;
        };
        if let Some(message) = execute_message(&state, run, execution.id) {
            link.execute(execution.id, message);
        }
    }
}

/// Cancels a run: what was never delivered is skipped now; agents running the rest are told.
pub(crate) async fn cancel_run(state: &AppState, run_id: RunId) -> Result<(), store::StoreError> {
    let canceled = state.store.cancel_run(run_id, now_millis()).await?;
    settled(state, canceled.outcome);
    for execution in canceled.to_cancel {
        if let Some(link) = state.gateway.link(execution.machine_id) {
            let execution_id = execution.id.as_uuid();
            crate::gateway::push(&link.sender, ServerMessage::Cancel { execution_id });
        }
    }
    Ok(())
}

/// Releases what rate-limited runs may send after a restart.
pub(crate) async fn resume_held_back(state: &AppState) {
    let advanced = match state.store.held_back_runs().await {
        Ok(runs) if runs.is_empty() => return,
        Ok(runs) => state.store.advance_runs(&runs, now_millis()).await,
        Err(error) => Err(error),
    };
    match advanced {
        Ok(outcome) => settled(state, outcome),
        Err(error) => tracing::error!(%error, "advancing rate-limited runs after a restart"),
    }
}

/// Ends pending executions at their delivery deadline. It sleeps until the earliest deadline
/// (or until a new run may have brought an earlier one): no polling.
pub(crate) async fn expire_deliveries(state: AppState) {
    loop {
        let changed = state.deadlines_changed.notified();
        let next = match state.store.next_delivery_deadline().await {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "reading delivery deadlines");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let now = now_millis();
        match next {
            Some(deadline) if deadline <= now => match state.store.expire_deliveries(now).await {
                Ok(outcome) => {
                    if !outcome.changed.is_empty() {
                        tracing::info!(
                            count = outcome.changed.len(),
                            "executions reached their delivery timeout"
                        );
                    }
                    settled(&state, outcome);
                }
                Err(error) => {
                    tracing::error!(%error, "ending executions past their delivery deadline");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Some(deadline) => {
                let wait = Duration::from_millis((deadline - now) as u64);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}
