//! Named run commands, `/v1/machines/{machine}/run-commands/{name}`: Azure's Run Command
//! resource, built on runs. `PUT` creates or replaces a name and runs it (the previous run of
//! that name is canceled, and the agent starts the new one only once the old process group is
//! gone); `PATCH` changes some properties and runs again; `GET` shows the latest run;
//! `DELETE` stops it and removes the name. Every run stays in the run history.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::{
    ExecutionId, ExecutionState, RunId, RunRequest, RunSpec, Targets, ValidationError,
    parse_duration,
};
use proto::api::ErrorBody;
use proto::run_command::{
    ParameterValue, ProtectedParameterName, RunCommand, RunCommandInstanceView, RunCommandList,
    RunCommandParameter, RunCommandProperties, RunCommandSource, RunCommandView,
};
use serde::Deserialize;
use serde_json::Value;
use store::{ExecutionRecord, MachineRecord, NewExecution, NewRun, RunCommandRecord, RunRecord};
use utoipa::IntoParams;

use super::convert;
use super::machines::resolve;
use crate::auth::Admin;
use crate::dispatch;
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::events::Event;
use crate::{AppState, now_millis};

/// How long a `PUT` or `PATCH` with `asyncExecution: false` waits for the script by default
/// before it answers `202 Accepted` with the resource's URL.
const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// The longest wait a caller may ask for with `?wait=`.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Keys around an Azure `properties` wrapper that mean nothing here.
const IGNORED_OUTER_KEYS: [&str; 5] = ["location", "tags", "id", "name", "type"];

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutQuery {
    /// Azure's API version: accepted and ignored.
    #[serde(rename = "api-version")]
    #[allow(dead_code)]
    api_version: Option<String>,
    /// With `asyncExecution: false`, how long to wait for the script before answering
    /// `202 Accepted` (`30s`, `5m`; default 60 s, at most 5 minutes).
    wait: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiVersionQuery {
    /// Azure's API version: accepted and ignored.
    #[serde(rename = "api-version")]
    #[allow(dead_code)]
    api_version: Option<String>,
}

fn machine_not_found(machine: &str) -> ApiError {
    ApiError::not_found(
        "MachineNotFound",
        format!("no machine is named or has the id `{machine}`"),
    )
    .with_field("machine")
}

fn run_command_not_found(machine: &str, name: &str) -> ApiError {
    ApiError::not_found(
        "RunCommandNotFound",
        format!("machine `{machine}` has no run command named `{name}`"),
    )
    .with_field("name")
}

async fn live_machine(state: &AppState, machine: &str) -> Result<MachineRecord, ApiError> {
    resolve(state, machine)
        .await?
        .ok_or_else(|| machine_not_found(machine))
}

/// Run command names: 1 to 80 letters, digits, `.`, `_` and `-`, starting with a letter or a
/// digit (Azure's resource names, minus what a URL or a shell would mangle).
fn check_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=80).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "InvalidRunCommandName",
            format!(
                "run command name `{name}` is invalid: use 1 to 80 letters, digits, `.`, `_` \
                 and `-`, starting with a letter or a digit"
            ),
        )
        .with_field("name"))
    }
}

/// A body's properties, and the prefix their field names have in it: `properties.` inside
/// Azure's wrapper, nothing without it.
struct Body {
    properties: RunCommandProperties,
    prefix: &'static str,
}

/// Fields whose values are secrets: an error about them never quotes what was sent.
fn is_secret_field(field: &str) -> bool {
    field.contains("protectedParameters") || field.contains("runAsPassword")
}

/// The properties of a body, with or without Azure's `properties` wrapper.
fn parse_body(name: &str, body: Value) -> Result<Body, ApiError> {
    let Value::Object(mut outer) = body else {
        return Err(ApiError::bad_request(
            "InvalidBody",
            "the body must be a JSON object of run command properties",
        ));
    };
    let (properties, prefix) = match outer.remove("properties") {
        None => (Value::Object(outer), ""),
        Some(properties) => {
            if let Some(unknown) = outer
                .keys()
                .find(|key| !IGNORED_OUTER_KEYS.contains(&key.as_str()))
            {
                return Err(ApiError::bad_request(
                    "UnknownField",
                    format!(
                        "unknown field `{unknown}` next to `properties`; only {} may be there",
                        IGNORED_OUTER_KEYS.join(", ")
                    ),
                )
                .with_field(unknown.clone()));
            }
            if let Some(given) = outer.get("name").and_then(Value::as_str)
                && !given.eq_ignore_ascii_case(name)
            {
                return Err(ApiError::bad_request(
                    "NameMismatch",
                    format!("the body names `{given}` but the URL names `{name}`"),
                )
                .with_field("name"));
            }
            (properties, "properties.")
        }
    };
    let properties = serde_path_to_error::deserialize(properties).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." {
            prefix.trim_end_matches('.').to_string()
        } else {
            format!("{prefix}{path}")
        };
        let problem = error.inner().to_string();
        let (code, message) = if problem.starts_with("unknown field") {
            ("UnknownField", format!("{field}: {problem}"))
        } else if is_secret_field(&field) {
            // serde quotes the value it could not take; this one is a secret.
            (
                "InvalidBody",
                format!("{field}: not a valid value (it is not shown: it is a secret)"),
            )
        } else {
            ("InvalidBody", format!("{field}: {problem}"))
        };
        ApiError::bad_request(code, message).with_field(field)
    })?;
    Ok(Body { properties, prefix })
}

/// A list of `{name, value}` as a map; a name given twice is an error.
fn parameter_map(
    list: Option<Vec<RunCommandParameter>>,
    field: &str,
) -> Result<BTreeMap<String, String>, ValidationError> {
    let mut map = BTreeMap::new();
    for (index, parameter) in list.unwrap_or_default().into_iter().enumerate() {
        let name = parameter.name.clone();
        if map
            .insert(name.clone(), parameter.value.into_text())
            .is_some()
        {
            return Err(ValidationError::new(
                "DuplicateParameter",
                format!("{field}[{index}].name"),
                format!("parameter `{name}` is given twice"),
            ));
        }
    }
    Ok(map)
}

/// A map of parameters as Azure's list of `{name, value}`, by name.
fn parameter_list(map: &BTreeMap<String, String>) -> Vec<RunCommandParameter> {
    map.iter()
        .map(|(name, value)| RunCommandParameter {
            name: name.clone(),
            value: ParameterValue::Text(value.clone()),
        })
        .collect()
}

/// Field names of run validation, as Azure's properties call them (before any prefix).
fn azure_field(field: &str) -> String {
    let (head, rest) = match field.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (field, None),
    };
    let mapped = match head {
        "script" => "source.script",
        "script_uri" => "source.scriptUri",
        "script_sha256" => "source.scriptSha256",
        "parameters" => "parameters",
        "protected_parameters" => "protectedParameters",
        "timeout" => "timeoutInSeconds",
        "output_blob_uri" => "outputBlobUri",
        "error_blob_uri" => "errorBlobUri",
        "run_as_user" => "runAsUser",
        _ => return field.to_string(),
    };
    match rest {
        Some(rest) => format!("{mapped}.{rest}"),
        None => mapped.to_string(),
    }
}

/// Validates the properties into the run they ask for, on `machine`. Fields in errors are
/// named as in the body, after `prefix`.
fn run_spec(
    state: &AppState,
    machine: &MachineRecord,
    properties: RunCommandProperties,
    prefix: &str,
) -> Result<RunSpec, ApiError> {
    let source = properties.source.ok_or_else(|| {
        ValidationError::new(
            "MissingSource",
            format!("{prefix}source"),
            "give the script as source.script or source.scriptUri",
        )
    })?;
    if let Some(command) = &source.command_id {
        return Err(ValidationError::new(
            "CommandNotFound",
            format!("{prefix}source.commandId"),
            format!(
                "saved command `{command}` does not exist: saved commands are not available \
                 yet, give source.script or source.scriptUri"
            ),
        )
        .into());
    }
    let request = RunRequest {
        machines: vec![machine.id.to_string()],
        script: source.script.unwrap_or_default(),
        script_uri: source.script_uri,
        script_sha256: source.script_sha256,
        parameters: parameter_map(properties.parameters, &format!("{prefix}parameters"))?,
        protected_parameters: parameter_map(
            properties.protected_parameters,
            &format!("{prefix}protectedParameters"),
        )?,
        timeout: properties
            .timeout_in_seconds
            .filter(|seconds| *seconds > 0)
            .map(|seconds| format!("{seconds}s")),
        output_blob_uri: properties.output_blob_uri,
        error_blob_uri: properties.error_blob_uri,
        run_as_user: properties.run_as_user,
        ..RunRequest::default()
    };
    // `runAsPassword` ends here: it is never stored, sent, logged or returned.
    drop(properties.run_as_password);
    let (_, spec) = request.validate(&state.limits).map_err(|mut error| {
        error.field = format!("{prefix}{}", azure_field(&error.field));
        error
    })?;
    Ok(spec)
}

/// The properties a stored run command was last run with, protected values included: the
/// base a `PATCH` changes.
fn stored_properties(command: &RunCommandRecord, spec: &RunSpec) -> RunCommandProperties {
    let list = |map| Some(parameter_list(map));
    RunCommandProperties {
        source: Some(RunCommandSource {
            script: spec.script_uri.is_none().then(|| spec.script.clone()),
            script_uri: spec.script_uri.clone(),
            script_sha256: spec.script_sha256.clone(),
            command_id: None,
        }),
        parameters: list(&spec.parameters),
        protected_parameters: list(&spec.protected_parameters),
        async_execution: Some(command.async_execution),
        run_as_user: spec.run_as_user.clone(),
        run_as_password: None,
        timeout_in_seconds: Some(spec.timeout.as_secs()),
        output_blob_uri: spec.output_blob_uri.clone(),
        error_blob_uri: spec.error_blob_uri.clone(),
        treat_failure_as_deployment_failure: Some(command.treat_failure_as_deployment_failure),
    }
}

/// Every property the patch gives replaces the stored one; a property it leaves out (or sends
/// as null) stays. A parameter the patch moves between the plain and the protected list
/// leaves the list it came from.
fn merge(mut base: RunCommandProperties, patch: RunCommandProperties) -> RunCommandProperties {
    let names = |list: &Option<Vec<RunCommandParameter>>| -> Vec<String> {
        list.iter()
            .flatten()
            .map(|parameter| parameter.name.clone())
            .collect()
    };
    let (plain, protected) = (names(&patch.parameters), names(&patch.protected_parameters));
    if let Some(list) = &mut base.parameters {
        list.retain(|parameter| !protected.contains(&parameter.name));
    }
    if let Some(list) = &mut base.protected_parameters {
        list.retain(|parameter| !plain.contains(&parameter.name));
    }
    RunCommandProperties {
        source: patch.source.or(base.source),
        parameters: patch.parameters.or(base.parameters),
        protected_parameters: patch.protected_parameters.or(base.protected_parameters),
        async_execution: patch.async_execution.or(base.async_execution),
        run_as_user: patch.run_as_user.or(base.run_as_user),
        run_as_password: patch.run_as_password,
        timeout_in_seconds: patch.timeout_in_seconds.or(base.timeout_in_seconds),
        output_blob_uri: patch.output_blob_uri.or(base.output_blob_uri),
        error_blob_uri: patch.error_blob_uri.or(base.error_blob_uri),
        treat_failure_as_deployment_failure: patch
            .treat_failure_as_deployment_failure
            .or(base.treat_failure_as_deployment_failure),
    }
}

fn wait_of(query: &PutQuery) -> Result<Duration, ApiError> {
    let Some(text) = query.wait.as_deref() else {
        return Ok(DEFAULT_WAIT);
    };
    let wait = parse_duration(text).map_err(|message| {
        ApiError::bad_request("InvalidDuration", format!("wait: {message}")).with_field("wait")
    })?;
    Ok(wait.min(MAX_WAIT))
}

/// Creates or replaces the run command and runs it.
#[utoipa::path(put, path = "/v1/machines/{machine}/run-commands/{name}", tag = "run-commands",
    params(("machine" = String, Path), ("name" = String, Path), PutQuery),
    request_body = RunCommandProperties,
    responses((status = 200, description = "Replaced; the script has ended, or asyncExecution is true", body = RunCommand),
              (status = 201, description = "Created; the script has ended, or asyncExecution is true", body = RunCommand),
              (status = 202, description = "Still running after the wait: poll the Location", body = RunCommand),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn put_run_command(
    State(state): State<AppState>,
    _admin: Admin,
    Path((machine, name)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<PutQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let wait = wait_of(&query)?;
    let body = parse_body(&name, body)?;
    let machine = live_machine(&state, &machine).await?;
    let spec = run_spec(&state, &machine, body.properties.clone(), body.prefix)?;
    let changing = state.run_commands.lock().await;
    submit(
        &state,
        changing,
        &machine,
        &name,
        &body.properties,
        spec,
        wait,
    )
    .await
}

/// Changes the given properties of a run command and runs it again.
#[utoipa::path(patch, path = "/v1/machines/{machine}/run-commands/{name}", tag = "run-commands",
    params(("machine" = String, Path), ("name" = String, Path), PutQuery),
    request_body = RunCommandProperties,
    responses((status = 200, body = RunCommand), (status = 202, body = RunCommand),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn patch_run_command(
    State(state): State<AppState>,
    _admin: Admin,
    Path((machine_name, name)): Path<(String, String)>,
    ApiQuery(query): ApiQuery<PutQuery>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    check_name(&name)?;
    let wait = wait_of(&query)?;
    let patch = parse_body(&name, body)?;
    let machine = live_machine(&state, &machine_name).await?;
    // Held from the read of what is stored to the write of the new run: a PUT, PATCH or
    // DELETE in between would otherwise be undone.
    let changing = state.run_commands.lock().await;
    let command = state
        .store
        .get_run_command(machine.id, &name)
        .await?
        .ok_or_else(|| run_command_not_found(&machine.name, &name))?;
    let run = state
        .store
        .get_run_spec(command.run_id)
        .await?
        .ok_or_else(|| ApiError::internal("a run command's run is missing"))?;
    let properties = merge(stored_properties(&command, &run.spec), patch.properties);
    let spec = run_spec(&state, &machine, properties.clone(), patch.prefix)?;
    submit(&state, changing, &machine, &name, &properties, spec, wait).await
}

/// Cancels what still runs of the name, creates the new run, and answers as asyncExecution
/// and the wait ask. `changing` (the run commands lock) is released once the run is stored.
async fn submit(
    state: &AppState,
    changing: tokio::sync::MutexGuard<'_, ()>,
    machine: &MachineRecord,
    name: &str,
    properties: &RunCommandProperties,
    mut spec: RunSpec,
    wait: Duration,
) -> Result<Response, ApiError> {
    let async_execution = properties.async_execution.unwrap_or(false);
    let treat_failure = properties
        .treat_failure_as_deployment_failure
        .unwrap_or(false);
    let previous = state.store.get_run_command(machine.id, name).await?;
    // The agent starts the new script only once these are gone.
    spec.replaces = cancel_open_runs(state, machine, name).await?;

    let now = now_millis();
    let run = NewRun {
        id: RunId::new(),
        created_at: now,
        targets: Targets::Machines(vec![machine.id.to_string()]),
        spec,
    };
    let execution = NewExecution {
        id: ExecutionId::new(),
        machine_id: machine.id,
        machine_name: machine.name.clone(),
        delivery_deadline: now + run.spec.delivery_timeout.as_millis() as i64,
        ineligible: None,
    };
    let command = RunCommandRecord {
        machine_id: machine.id,
        // The name as first given: names differ from it in case only.
        name: previous
            .as_ref()
            .map_or_else(|| name.to_string(), |previous| previous.name.clone()),
        run_id: run.id,
        async_execution,
        treat_failure_as_deployment_failure: treat_failure,
        created_at: previous
            .as_ref()
            .map_or(now, |previous| previous.created_at),
        updated_at: now,
    };
    let created = state
        .store
        .put_run_command(&command, &run, std::slice::from_ref(&execution))
        .await?;
    drop(changing);
    state.deadlines_changed.notify_one();
    dispatch::settled(state, created);
    tracing::info!(machine = %machine.name, name, run = %run.id, "run command put");

    let deadline = tokio::time::Instant::now()
        + if async_execution {
            Duration::ZERO
        } else {
            wait
        };
    let execution = wait_for_end(state, execution.id, deadline).await?;
    let done = async_execution || execution.state.is_terminal();
    let status = match (done, previous.is_some()) {
        (false, _) => StatusCode::ACCEPTED,
        (true, false) => StatusCode::CREATED,
        (true, true) => StatusCode::OK,
    };
    let run = state
        .store
        .get_run_spec(run.id)
        .await?
        .ok_or_else(|| ApiError::internal("a run vanished right after it was created"))?;
    let view = view(machine, &command, &run, execution);
    let mut response = (status, axum::Json(&view)).into_response();
    if status == StatusCode::ACCEPTED
        && let Ok(location) = HeaderValue::from_str(&view.id)
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Cancels every run of the name still open on the machine, not just the latest: an earlier
/// one may still be dying, or waiting for an agent that is away, or belong to a deleted
/// command of the same name. Answers their executions.
async fn cancel_open_runs(
    state: &AppState,
    machine: &MachineRecord,
    name: &str,
) -> Result<Vec<ExecutionId>, ApiError> {
    let open = state
        .store
        .open_run_command_executions(machine.id, name)
        .await?;
    let mut canceled = std::collections::HashSet::new();
    for execution in &open {
        if canceled.insert(execution.run_id) {
            dispatch::cancel_run(state, execution.run_id).await?;
        }
    }
    Ok(open.iter().map(|execution| execution.id).collect())
}

/// The execution once it is terminal, or as it is at `deadline`.
async fn wait_for_end(
    state: &AppState,
    id: ExecutionId,
    deadline: tokio::time::Instant,
) -> Result<ExecutionRecord, ApiError> {
    loop {
        // Subscribe before reading, so a change between the read and the wait is not missed.
        let mut events = state.events.subscribe();
        let execution = state.store.get_execution(id).await?.ok_or_else(|| {
            ApiError::internal("an execution vanished right after it was created")
        })?;
        if execution.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(execution);
        }
        let changed = events.wait_for(|event| {
            matches!(event, Event::Execution { execution_id, state, .. }
                if *execution_id == id && state.is_terminal())
        });
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// A run command with its latest execution.
#[utoipa::path(get, path = "/v1/machines/{machine}/run-commands/{name}", tag = "run-commands",
    params(("machine" = String, Path), ("name" = String, Path), ApiVersionQuery),
    responses((status = 200, body = RunCommand), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_run_command(
    State(state): State<AppState>,
    _admin: Admin,
    Path((machine, name)): Path<(String, String)>,
    ApiQuery(_query): ApiQuery<ApiVersionQuery>,
) -> Result<axum::Json<RunCommand>, ApiError> {
    let machine = live_machine(&state, &machine).await?;
    let command = state
        .store
        .get_run_command(machine.id, &name)
        .await?
        .ok_or_else(|| run_command_not_found(&machine.name, &name))?;
    Ok(axum::Json(load_view(&state, &machine, &command).await?))
}

/// A machine's run commands, by name, each with its latest execution. No cap per machine.
#[utoipa::path(get, path = "/v1/machines/{machine}/run-commands", tag = "run-commands",
    params(("machine" = String, Path), ApiVersionQuery),
    responses((status = 200, body = RunCommandList), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_run_commands(
    State(state): State<AppState>,
    _admin: Admin,
    Path(machine): Path<String>,
    ApiQuery(_query): ApiQuery<ApiVersionQuery>,
) -> Result<axum::Json<RunCommandList>, ApiError> {
    let machine = live_machine(&state, &machine).await?;
    let mut value = Vec::new();
    for command in state.store.list_run_commands(machine.id).await? {
        value.push(load_view(&state, &machine, &command).await?);
    }
    Ok(axum::Json(RunCommandList { value }))
}

/// Stops the run command's script if it is still running and removes the name. Its runs stay
/// in the run history.
#[utoipa::path(delete, path = "/v1/machines/{machine}/run-commands/{name}", tag = "run-commands",
    params(("machine" = String, Path), ("name" = String, Path), ApiVersionQuery),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_run_command(
    State(state): State<AppState>,
    _admin: Admin,
    Path((machine, name)): Path<(String, String)>,
    ApiQuery(_query): ApiQuery<ApiVersionQuery>,
) -> Result<StatusCode, ApiError> {
    let machine = live_machine(&state, &machine).await?;
    let changing = state.run_commands.lock().await;
    let command = state
        .store
        .get_run_command(machine.id, &name)
        .await?
        .ok_or_else(|| run_command_not_found(&machine.name, &name))?;
    cancel_open_runs(&state, &machine, &name).await?;
    state.store.delete_run_command(machine.id, &name).await?;
    drop(changing);
    tracing::info!(machine = %machine.name, name, run = %command.run_id, "run command deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn load_view(
    state: &AppState,
    machine: &MachineRecord,
    command: &RunCommandRecord,
) -> Result<RunCommand, ApiError> {
    let run = state
        .store
        .get_run_spec(command.run_id)
        .await?
        .ok_or_else(|| ApiError::internal("a run command's run is missing"))?;
    let execution = state
        .store
        .run_executions(command.run_id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("a run command's execution is missing"))?;
    Ok(view(machine, command, &run, execution))
}

/// Azure's `executionState` for one of ours.
fn execution_state(state: ExecutionState) -> &'static str {
    match state {
        ExecutionState::Pending | ExecutionState::Delivered => "Pending",
        ExecutionState::Running => "Running",
        ExecutionState::Succeeded => "Succeeded",
        // The script never ran because the machine never took it: the message says so.
        ExecutionState::Failed | ExecutionState::DeliveryTimedOut => "Failed",
        ExecutionState::TimedOut => "TimedOut",
        ExecutionState::Canceled | ExecutionState::Skipped => "Canceled",
        // The agent lost the process: nobody knows how it ended.
        ExecutionState::Interrupted => "Unknown",
    }
}

/// Azure's `provisioningState`: in progress until the script has ended (or, with
/// asyncExecution, until it started); then whether the deployment worked. A script that ran
/// and failed is a successful deployment unless treatFailureAsDeploymentFailure says
/// otherwise; one that never started is a failed one.
fn provisioning_state(execution: &ExecutionRecord, command: &RunCommandRecord) -> &'static str {
    let in_progress = if command.created_at == command.updated_at {
        "Creating"
    } else {
        "Updating"
    };
    match execution.state {
        ExecutionState::Pending | ExecutionState::Delivered => in_progress,
        ExecutionState::Running if command.async_execution => "Succeeded",
        ExecutionState::Running => in_progress,
        ExecutionState::Succeeded => "Succeeded",
        ExecutionState::Canceled | ExecutionState::Skipped => "Canceled",
        ExecutionState::Failed
        | ExecutionState::TimedOut
        | ExecutionState::DeliveryTimedOut
        | ExecutionState::Interrupted => {
            if command.treat_failure_as_deployment_failure || execution.started_at.is_none() {
                "Failed"
            } else {
                "Succeeded"
            }
        }
    }
}

fn view(
    machine: &MachineRecord,
    command: &RunCommandRecord,
    run: &RunRecord,
    execution: ExecutionRecord,
) -> RunCommand {
    let spec = &run.spec;
    let execution_id = execution.id.to_string();
    let instance_view = RunCommandInstanceView {
        execution_state: execution_state(execution.state).to_string(),
        execution_message: execution.message.clone(),
        exit_code: execution.exit_code,
        output: String::from_utf8_lossy(&execution.stdout_tail).into_owned(),
        error: String::from_utf8_lossy(&execution.stderr_tail).into_owned(),
        start_time: execution.started_at.map(convert::time),
        end_time: execution.finished_at.map(convert::time),
        run_id: run.id.to_string(),
        state: execution.state.as_str().to_string(),
        error_code: execution.error_code.clone(),
        output_uri: format!("/v1/executions/{execution_id}/output/stdout"),
        error_uri: format!("/v1/executions/{execution_id}/output/stderr"),
        execution_id,
    };
    RunCommand {
        id: format!(
            "/v1/machines/{}/run-commands/{}",
            machine.name, command.name
        ),
        name: command.name.clone(),
        machine: machine.name.clone(),
        properties: RunCommandView {
            source: RunCommandSource {
                script: spec.script_uri.is_none().then(|| spec.script.clone()),
                script_uri: spec.script_uri.as_deref().map(convert::without_query),
                script_sha256: spec.script_sha256.clone(),
                command_id: None,
            },
            parameters: parameter_list(&spec.parameters),
            protected_parameters: spec
                .protected_parameters
                .keys()
                .map(|name| ProtectedParameterName { name: name.clone() })
                .collect(),
            async_execution: command.async_execution,
            run_as_user: spec.run_as_user.clone(),
            timeout_in_seconds: spec.timeout.as_secs(),
            output_blob_uri: spec.output_blob_uri.as_deref().map(convert::without_query),
            error_blob_uri: spec.error_blob_uri.as_deref().map(convert::without_query),
            treat_failure_as_deployment_failure: command.treat_failure_as_deployment_failure,
            provisioning_state: provisioning_state(&execution, command).to_string(),
            instance_view,
            created_at: convert::time(command.created_at),
            updated_at: convert::time(command.updated_at),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::convert::without_query;

    #[test]
    fn fields_are_named_as_azure_names_them() {
        for (ours, azure) in [
            ("script", "source.script"),
            ("parameters.port", "parameters.port"),
            ("protected_parameters", "protectedParameters"),
            ("timeout", "timeoutInSeconds"),
            ("targets", "targets"),
        ] {
            assert_eq!(azure_field(ours), azure, "{ours}");
        }
    }

    #[test]
    fn signatures_are_cut_from_shown_urls() {
        assert_eq!(
            without_query("https://acct.blob.core.windows.net/c/out.txt?sv=1&sig=secret"),
            "https://acct.blob.core.windows.net/c/out.txt"
        );
        assert_eq!(without_query("http://host/x"), "http://host/x");
    }

    #[test]
    fn names_follow_the_rules() {
        assert!(check_name("EndpointAccessCommand").is_ok());
        assert!(check_name("a.b_c-1").is_ok());
        for bad in ["", "-x", "has space", "a/b", &"x".repeat(81)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
