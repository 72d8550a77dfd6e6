//! The dispatcher: turns runs into deliveries to connected agents, cancels, and ends
//! executions whose machine did not take them before their delivery deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use domain::{ExecutionId, MachineId, RunId};
use proto::agent::{Execute, ServerMessage};
use store::{ExecutionRecord, RunRecord};

use crate::events::Event;
use crate::{AppState, now_millis};

/// The message that asks an agent to run one execution of `run`.
pub(crate) fn execute_message(
    state: &AppState,
    run: &RunRecord,
    execution_id: ExecutionId,
) -> Option<ServerMessage> {
    // Validation proved the script renders; a failure here means stored data changed under us.
    let script = match run.spec.rendered_script() {
        Ok(script) => script,
        Err(error) => {
            tracing::error!(run = %run.id, %error, "stored run does not render");
            return None;
        }
    };
    // Parameters are exported as environment variables of the same name; an explicit
    // environment variable of the same name wins.
    let mut env: BTreeMap<String, String> = run.spec.parameters.clone();
    env.extend(run.spec.env.clone());
    Some(ServerMessage::Execute(Execute {
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
    }))
}

/// Pushes the new executions of `run` to the agents that are connected now. Agents that are
/// not get theirs when they connect.
pub(crate) async fn deliver(
    state: AppState,
    run: RunRecord,
    executions: Vec<(ExecutionId, MachineId)>,
) {
    for (execution_id, machine_id) in executions {
        let Some(link) = state.gateway.link(machine_id) else {
            continue;
        };
        if let Some(message) = execute_message(&state, &run, execution_id) {
            // A closed link means the agent just went away; it gets the execution on reconnect.
            let _ = link.send(message).await;
        }
    }
}

pub(crate) fn publish_changes(state: &AppState, changed: &[ExecutionRecord]) {
    for execution in changed {
        state.events.publish(Event::Execution {
            run_id: execution.run_id,
            execution_id: execution.id,
        });
    }
}

/// Cancels a run: what was never delivered is skipped now; agents running the rest are told.
pub(crate) async fn cancel_run(state: &AppState, run_id: RunId) -> Result<(), store::StoreError> {
    let outcome = state.store.cancel_run(run_id, now_millis()).await?;
    publish_changes(state, &outcome.skipped);
    for execution in outcome.to_cancel {
        if let Some(link) = state.gateway.link(execution.machine_id) {
            let _ = link
                .send(ServerMessage::Cancel {
                    execution_id: execution.id.as_uuid(),
                })
                .await;
        }
    }
    Ok(())
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
                Ok(expired) => {
                    if !expired.is_empty() {
                        tracing::info!(
                            count = expired.len(),
                            "executions reached their delivery timeout"
                        );
                    }
                    publish_changes(&state, &expired);
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
