//! `GET /v1/runs/{run}/events`: a run's state changes as server-sent events, for the CLI's
//! progress display and, later, the web console.
//!
//! Events: `run` (the run with its counts, first and whenever the stream had to catch up),
//! `execution` (one execution changed state: `ExecutionEvent`), and `done` (the run, once every
//! execution is terminal; the stream ends after it).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use domain::{ExecutionId, ExecutionState, RunId, RunStatus};
use futures_util::Stream;
use proto::api::{ErrorBody, ExecutionEvent};

use super::convert;
use crate::AppState;
use crate::auth::Admin;
use crate::error::ApiError;
use crate::events::{Event, Subscription};

/// A run's state changes as server-sent events (`run`, `execution`, `done`).
#[utoipa::path(get, path = "/v1/runs/{run}/events", tag = "runs", params(("run" = String, Path)),
    responses((status = 200, content_type = "text/event-stream",
               description = "events `run` (Run), `execution` (ExecutionEvent), `done` (Run)"),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn run_events(
    State(state): State<AppState>,
    _admin: Admin,
    Path(run): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let not_found = || {
        ApiError::not_found("RunNotFound", format!("no run has the id `{run}`")).with_field("run")
    };
    let id: RunId = run.parse().map_err(|_| not_found())?;
    let subscription = state.events.subscribe();
    let mut follower = Follower {
        state,
        id,
        subscription,
        states: HashMap::new(),
        queued: VecDeque::new(),
        finished: false,
    };
    if !follower.snapshot().await? {
        return Err(not_found());
    }
    let stream = futures_util::stream::unfold(follower, |mut follower| async move {
        follower.next().await.map(|event| (Ok(event), follower))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

struct Follower {
    state: AppState,
    id: RunId,
    subscription: Subscription,
    /// Every execution's state as last sent.
    states: HashMap<ExecutionId, ExecutionState>,
    queued: VecDeque<SseEvent>,
    finished: bool,
}

impl Follower {
    /// Reads the run afresh and queues a `run` event (and `done` if it is over). False if the
    /// run does not exist.
    async fn snapshot(&mut self) -> Result<bool, ApiError> {
        let Some(record) = self.state.store.get_run(self.id).await? else {
            return Ok(false);
        };
        let executions = self.state.store.run_executions(self.id).await?;
        self.states = executions
            .iter()
            .map(|execution| (execution.id, execution.state))
            .collect();
        let done = RunStatus::derive(&record.counts, record.cancel_requested).is_done();
        let run = convert::run(record, None);
        self.queued.push_back(json_event("run", &run));
        if done {
            self.queued.push_back(json_event("done", &run));
            self.finished = true;
        }
        Ok(true)
    }

    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.finished {
                return None;
            }
            match self.subscription.next().await {
                Some(Event::Execution {
                    run_id,
                    execution_id,
                    state,
                    exit_code,
                }) if run_id == self.id => {
                    let previous = self
                        .states
                        .get(&execution_id)
                        .copied()
                        .unwrap_or(ExecutionState::Pending);
                    // Events come from several tasks and a catch-up may replay old ones: only
                    // a move forward is news.
                    if !previous.can_become(state) {
                        continue;
                    }
                    self.states.insert(execution_id, state);
                    self.queued.push_back(json_event(
                        "execution",
                        &ExecutionEvent {
                            id: execution_id.to_string(),
                            run_id: run_id.to_string(),
                            state: state.as_str().to_string(),
                            previous_state: previous.as_str().to_string(),
                            exit_code,
                        },
                    ));
                }
                Some(Event::RunDone { run_id }) if run_id == self.id => {
                    self.finish().await;
                }
                Some(_) => {}
                // Missed some: start over from the store, listening afresh first so that the
                // old backlog is not replayed over the new snapshot.
                None => {
                    self.subscription = self.state.events.subscribe();
                    if let Err(error) = self.snapshot().await {
                        tracing::warn!(run = %self.id, ?error, "re-reading a run for its event stream");
                        return None;
                    }
                }
            }
        }
    }

    async fn finish(&mut self) {
        match self.state.store.get_run(self.id).await {
            Ok(Some(record)) => {
                self.queued
                    .push_back(json_event("done", &convert::run(record, None)));
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(run = %self.id, %error, "reading a finished run"),
        }
        self.finished = true;
    }
}

fn json_event<T: serde::Serialize>(name: &str, body: &T) -> SseEvent {
    SseEvent::default()
        .event(name)
        .json_data(body)
        .unwrap_or_else(|_| SseEvent::default().event(name))
}
