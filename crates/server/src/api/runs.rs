//! Runs and their executions: create, list, show (optionally waiting for the end), cancel, and
//! output (whole, or followed live).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{ExecutionId, RunId, RunRequest, RunStatus, Targets, ValidationError, parse_duration};
use proto::api::{CreateRun, ErrorBody, Execution, Run, RunList};
use serde::Deserialize;
use store::{MachineRecord, NewExecution, NewRun};
use utoipa::IntoParams;

use super::convert;
use super::machines::resolve_any;
use crate::auth::Admin;
use crate::dispatch;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::events::Event;
use crate::{AppState, now_millis};

/// Longest a `GET /v1/runs/{run}?wait=` call holds the request open.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// A new run's answer lists its executions when it has at most this many.
const MAX_EXECUTIONS_IN_ANSWER: u64 = 1000;
/// Bytes of output per chunk of a streamed response.
const OUTPUT_CHUNK: usize = 64 * 1024;

fn run_not_found(run: &str) -> ApiError {
    ApiError::not_found("RunNotFound", format!("no run has the id `{run}`")).with_field("run")
}

fn parse_run_id(run: &str) -> Result<RunId, ApiError> {
    run.parse().map_err(|_| run_not_found(run))
}

/// The machines the targets name, or the error that says which one is missing.
async fn resolve_targets(
    state: &AppState,
    targets: &Targets,
) -> Result<Vec<MachineRecord>, ApiError> {
    match targets {
        Targets::Machines(names) => {
            let mut machines = Vec::with_capacity(names.len());
            let mut seen = std::collections::HashSet::new();
            for (index, name) in names.iter().enumerate() {
                let machine = resolve_any(state, name).await?.ok_or_else(|| {
                    ValidationError::new(
                        "MachineNotFound",
                        format!("targets.machines[{index}]"),
                        format!("no machine is named or has the id `{name}`"),
                    )
                })?;
                if seen.insert(machine.id) {
                    machines.push(machine);
                }
            }
            Ok(machines)
        }
        Targets::Selector(selector) => {
            let machines: Vec<_> = state
                .store
                .list_machines()
                .await?
                .into_iter()
                .filter(|machine| selector.matches(&machine.labels))
                .collect();
            if machines.is_empty() {
                return Err(ValidationError::new(
                    "NoMatchingMachines",
                    "targets.selector",
                    format!("no machine matches the selector `{selector}`"),
                )
                .into());
            }
            Ok(machines)
        }
        Targets::All => {
            let machines = state.store.list_machines().await?;
            if machines.is_empty() {
                return Err(ValidationError::new(
                    "NoMatchingMachines",
                    "targets.all",
                    "no machine is enrolled yet",
                )
                .into());
            }
            Ok(machines)
        }
    }
}

/// Creates a run and sends it to its machines at once. Answers the run, with its executions
/// when it has at most 1,000 (else read them from `/v1/runs/{run}/executions`).
#[utoipa::path(post, path = "/v1/runs", tag = "runs", request_body = CreateRun,
    responses((status = 201, body = Run), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn create_run(
    State(state): State<AppState>,
    _admin: Admin,
    ApiJson(body): ApiJson<CreateRun>,
) -> Result<(StatusCode, axum::Json<Run>), ApiError> {
    let request = RunRequest {
        machines: body.targets.machines,
        selector: body.targets.selector,
        all: body.targets.all,
        script: body.script,
        interpreter: body.interpreter,
        parameters: body.parameters,
        env: body.env,
        workdir: body.workdir,
        timeout: body.timeout.map(|value| value.into_text()),
        delivery_timeout: body.delivery_timeout.map(|value| value.into_text()),
        max_concurrency: body.max_concurrency.map(|value| value.into_text()),
        max_errors: body.max_errors.map(|value| value.into_text()),
        script_uri: body.script_uri,
        script_sha256: body.script_sha256,
        output_blob_uri: body.output_blob_uri,
        error_blob_uri: body.error_blob_uri,
        protected_parameters: body.protected_parameters,
        run_as_user: body.run_as_user,
    };
    let (targets, spec) = request.validate(&state.limits)?;
    let machines = resolve_targets(&state, &targets).await?;

    let now = now_millis();
    let deadline = now + spec.delivery_timeout.as_millis() as i64;
    let run = NewRun {
        id: RunId::new(),
        created_at: now,
        targets,
        spec,
    };
    let executions: Vec<NewExecution> = machines
        .into_iter()
        .map(|machine| NewExecution {
            id: ExecutionId::new(),
            delivery_deadline: deadline,
            // A deleted machine named in the targets fails on its own; the rest of the run
            // goes ahead.
            ineligible: machine.deleted_at.map(|at| {
                format!(
                    "the machine `{}` was deleted at {}: nothing was sent",
                    machine.name,
                    convert::time(at)
                )
            }),
            machine_id: machine.id,
            machine_name: machine.name,
        })
        .collect();
    let created = state.store.create_run(&run, &executions).await?;
    state.deadlines_changed.notify_one();
    // Delivery starts before this request is answered: the machines need not wait for it.
    dispatch::settled(&state, created);

    let record = state
        .store
        .get_run(run.id)
        .await?
        .ok_or_else(|| ApiError::internal("a run vanished right after it was created"))?;
    // A large fan-out's executions are a page of their own (GET /v1/runs/{id}/executions):
    // answering thousands here would only delay the answer.
    let executions = if record.total <= MAX_EXECUTIONS_IN_ANSWER {
        Some(state.store.run_executions(run.id).await?)
    } else {
        None
    };
    tracing::info!(run = %run.id, executions = record.total, "run created");
    Ok((
        StatusCode::CREATED,
        axum::Json(convert::run(record, executions)),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListRunsQuery {
    /// Most runs to return (1 to 1000, default 50).
    limit: Option<u32>,
    /// Only runs older than this run id (the `next_before` of the previous page).
    before: Option<String>,
}

/// Runs, newest first.
#[utoipa::path(get, path = "/v1/runs", tag = "runs", params(ListRunsQuery),
    responses((status = 200, body = RunList), (status = 400, body = ErrorBody)))]
pub(crate) async fn list_runs(
    State(state): State<AppState>,
    _admin: Admin,
    ApiQuery(query): ApiQuery<ListRunsQuery>,
) -> Result<axum::Json<RunList>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(
            ApiError::bad_request("InvalidLimit", "limit must be between 1 and 1000")
                .with_field("limit"),
        );
    }
    let before = query
        .before
        .as_deref()
        .map(|text| {
            text.parse::<RunId>().map_err(|_| {
                ApiError::bad_request("InvalidCursor", format!("`{text}` is not a run id"))
                    .with_field("before")
            })
        })
        .transpose()?;
    let records = state.store.list_runs(before, limit).await?;
    let next_before = (records.len() == limit as usize)
        .then(|| records.last().map(|run| run.id.to_string()))
        .flatten();
    let runs = records
        .into_iter()
        .map(|record| convert::run(record, None))
        .collect();
    Ok(axum::Json(RunList { runs, next_before }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetRunQuery {
    /// Hold the request until the run is done or this long has passed (`30s`, `5m`; at most
    /// 5 minutes), then answer the run as it is.
    wait: Option<String>,
}

/// One run with all its executions.
#[utoipa::path(get, path = "/v1/runs/{run}", tag = "runs", params(("run" = String, Path), GetRunQuery),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_run(
    State(state): State<AppState>,
    _admin: Admin,
    Path(run): Path<String>,
    ApiQuery(query): ApiQuery<GetRunQuery>,
) -> Result<axum::Json<Run>, ApiError> {
    let id = parse_run_id(&run)?;
    let wait = query
        .wait
        .as_deref()
        .map(|text| {
            parse_duration(text).map_err(|message| {
                ApiError::bad_request("InvalidDuration", format!("wait: {message}"))
                    .with_field("wait")
            })
        })
        .transpose()?
        .unwrap_or_default()
        .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Subscribe before reading, so a change between the read and the wait is not missed.
        let mut events = state.events.subscribe();
        let record = state
            .store
            .get_run(id)
            .await?
            .ok_or_else(|| run_not_found(&run))?;
        let done = RunStatus::derive(&record.counts, record.cancel_requested).is_done();
        if done || tokio::time::Instant::now() >= deadline {
            let executions = state.store.run_executions(id).await?;
            return Ok(axum::Json(convert::run(record, Some(executions))));
        }
        // Only the end matters here: waiting on every execution's change would re-read a
        // large run thousands of times.
        let changed =
            events.wait_for(|event| matches!(event, Event::RunDone { run_id } if *run_id == id));
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// Cancels a run: executions not yet delivered are skipped; running ones are stopped.
#[utoipa::path(post, path = "/v1/runs/{run}/cancel", tag = "runs", params(("run" = String, Path)),
    responses((status = 200, body = Run), (status = 404, body = ErrorBody)))]
pub(crate) async fn cancel_run(
    State(state): State<AppState>,
    _admin: Admin,
    Path(run): Path<String>,
) -> Result<axum::Json<Run>, ApiError> {
    let id = parse_run_id(&run)?;
    if state.store.get_run(id).await?.is_none() {
        return Err(run_not_found(&run));
    }
    dispatch::cancel_run(&state, id).await?;
    let record = state
        .store
        .get_run(id)
        .await?
        .ok_or_else(|| run_not_found(&run))?;
    let executions = state.store.run_executions(id).await?;
    Ok(axum::Json(convert::run(record, Some(executions))))
}

/// A run's executions, by machine name.
#[utoipa::path(get, path = "/v1/runs/{run}/executions", tag = "runs", params(("run" = String, Path)),
    responses((status = 200, body = Vec<Execution>), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_executions(
    State(state): State<AppState>,
    _admin: Admin,
    Path(run): Path<String>,
) -> Result<axum::Json<Vec<Execution>>, ApiError> {
    let id = parse_run_id(&run)?;
    if state.store.get_run(id).await?.is_none() {
        return Err(run_not_found(&run));
    }
    let executions = state.store.run_executions(id).await?;
    Ok(axum::Json(
        executions.into_iter().map(convert::execution).collect(),
    ))
}

fn execution_not_found(execution: &str) -> ApiError {
    ApiError::not_found(
        "ExecutionNotFound",
        format!("no execution has the id `{execution}`"),
    )
    .with_field("execution")
}

/// One execution.
#[utoipa::path(get, path = "/v1/executions/{execution}", tag = "runs", params(("execution" = String, Path)),
    responses((status = 200, body = Execution), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_execution(
    State(state): State<AppState>,
    _admin: Admin,
    Path(execution): Path<String>,
) -> Result<axum::Json<Execution>, ApiError> {
    let id: ExecutionId = execution
        .parse()
        .map_err(|_| execution_not_found(&execution))?;
    let record = state
        .store
        .get_execution(id)
        .await?
        .ok_or_else(|| execution_not_found(&execution))?;
    Ok(axum::Json(convert::execution(record)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputQuery {
    /// Start at this byte (default 0).
    offset: Option<u64>,
    /// Keep the response open and send output as it arrives, until the execution ends.
    follow: Option<bool>,
}

/// The exact bytes of one output stream (`stdout` or `stderr`) of an execution, as stored:
/// everything up to the output cap.
#[utoipa::path(get, path = "/v1/executions/{execution}/output/{stream}", tag = "runs",
    params(("execution" = String, Path), ("stream" = String, Path, description = "stdout or stderr"), OutputQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
              (status = 404, body = ErrorBody)))]
pub(crate) async fn execution_output(
    State(state): State<AppState>,
    _admin: Admin,
    Path((execution, stream)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<OutputQuery>,
) -> Result<Response, ApiError> {
    let id: ExecutionId = execution
        .parse()
        .map_err(|_| execution_not_found(&execution))?;
    if state.store.get_execution(id).await?.is_none() {
        return Err(execution_not_found(&execution));
    }
    let stream = match stream.as_str() {
        "stdout" => 0,
        "stderr" => 1,
        other => {
            return Err(ApiError::bad_request(
                "InvalidStream",
                format!("stream `{other}` does not exist: use stdout or stderr"),
            )
            .with_field("stream"));
        }
    };
    let follow = query.follow.unwrap_or(false);
    let start = OutputCursor {
        state,
        id,
        stream,
        offset: query.offset.unwrap_or(0),
        follow,
    };
    let body = futures_util::stream::unfold(start, |mut cursor| async move {
        match cursor.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok::<_, std::io::Error>(chunk), cursor)),
            Ok(None) => None,
            Err(error) => Some((Err(error), cursor)),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response())
}

struct OutputCursor {
    state: AppState,
    id: ExecutionId,
    /// 0 for stdout, 1 for stderr.
    stream: usize,
    offset: u64,
    follow: bool,
}

impl OutputCursor {
    /// The next chunk, or `None` at the end: at the end of what is stored, or, when
    /// following, once the execution is over and everything was sent.
    async fn next_chunk(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            let mut events = self.state.events.subscribe();
            let chunk = self
                .state
                .read_output(self.id, self.stream, self.offset, OUTPUT_CHUNK)
                .await?;
            if !chunk.is_empty() {
                self.offset += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if !self.follow {
                return Ok(None);
            }
            let over = match self.state.store.get_execution(self.id).await {
                Ok(Some(execution)) => execution.state.is_terminal(),
                Ok(None) => true,
                Err(error) => return Err(std::io::Error::other(error.to_string())),
            };
            if over {
                // The final output is stored before the state turns terminal; read once more.
                let chunk = self
                    .state
                    .read_output(self.id, self.stream, self.offset, OUTPUT_CHUNK)
                    .await?;
                if chunk.is_empty() {
                    return Ok(None);
                }
                self.offset += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            let id = self.id;
            events
                .wait_for(|event| match event {
                    Event::Output { execution_id } | Event::Execution { execution_id, .. } => {
                        *execution_id == id
                    }
                    Event::RunDone { .. } => false,
                })
                .await;
        }
    }
}
