//! Machines: list, show, delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use domain::MachineId;
use proto::api::{ErrorBody, Machine, MachineList};
use store::MachineRecord;

use super::convert;
use crate::auth::Admin;
use crate::dispatch;
use crate::error::ApiError;
use crate::{AppState, now_millis};

/// Finds a live machine by id or by name.
pub(crate) async fn resolve(
    state: &AppState,
    name_or_id: &str,
) -> Result<Option<MachineRecord>, ApiError> {
    Ok(resolve_any(state, name_or_id)
        .await?
        .filter(|machine| machine.deleted_at.is_none()))
}

/// Finds a machine by id or by name, deleted ones included (a live one wins a name).
pub(crate) async fn resolve_any(
    state: &AppState,
    name_or_id: &str,
) -> Result<Option<MachineRecord>, ApiError> {
    if let Ok(id) = name_or_id.parse::<MachineId>()
        && let Some(machine) = state.store.get_machine(id).await?
    {
        return Ok(Some(machine));
    }
    Ok(state.store.find_machine_by_name(name_or_id).await?)
}

fn not_found(name_or_id: &str) -> ApiError {
    ApiError::not_found(
        "MachineNotFound",
        format!("no machine is named or has the id `{name_or_id}`"),
    )
    .with_field("machine")
}

/// Every enrolled machine, by name.
#[utoipa::path(get, path = "/v1/machines", tag = "machines",
    responses((status = 200, body = MachineList), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_machines(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<axum::Json<MachineList>, ApiError> {
    let now = now_millis();
    let machines = state
        .store
        .list_machines()
        .await?
        .into_iter()
        .map(|machine| {
            let online = state.gateway.is_online(machine.id);
            convert::machine(machine, online, now)
        })
        .collect();
    Ok(axum::Json(MachineList { machines }))
}

/// One machine, by name or id.
#[utoipa::path(get, path = "/v1/machines/{machine}", tag = "machines",
    params(("machine" = String, Path, description = "machine name or id")),
    responses((status = 200, body = Machine), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_machine(
    State(state): State<AppState>,
    _admin: Admin,
    Path(machine): Path<String>,
) -> Result<axum::Json<Machine>, ApiError> {
    let record = resolve(&state, &machine)
        .await?
        .ok_or_else(|| not_found(&machine))?;
    let online = state.gateway.is_online(record.id);
    Ok(axum::Json(convert::machine(record, online, now_millis())))
}

/// Deletes a machine: its token stops working, its agent is disconnected, and its unfinished
/// executions end as failed. Its past runs stay.
#[utoipa::path(delete, path = "/v1/machines/{machine}", tag = "machines",
    params(("machine" = String, Path, description = "machine name or id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub(crate) async fn delete_machine(
    State(state): State<AppState>,
    _admin: Admin,
    Path(machine): Path<String>,
) -> Result<StatusCode, ApiError> {
    let record = resolve(&state, &machine)
        .await?
        .ok_or_else(|| not_found(&machine))?;
    let ended = state.store.delete_machine(record.id, now_millis()).await?;
    dispatch::settled(&state, ended);
    state.gateway.disconnect(record.id);
    tracing::info!(machine = %record.id, name = %record.name, "machine deleted");
    Ok(StatusCode::NO_CONTENT)
}
