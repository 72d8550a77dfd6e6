//! Health, agent enrollment and the agent's WebSocket.

use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::StatusCode;
use axum::response::Response;
use domain::MachineId;
use proto::api::{EnrollRequest, EnrollResponse, ErrorBody, Health};
use store::{NewMachine, TokenKind};

use crate::auth::{AgentMachine, Enroller, hash_token, new_token};
use crate::error::{ApiError, ApiJson};
use crate::{AppState, gateway, now_millis};

/// Is the server up? Needs no token.
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, body = Health)))]
pub(crate) async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

fn check_machine_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "InvalidMachineName",
            format!("machine name `{name}` is invalid: use 1 to 63 of A-Z a-z 0-9 _ - ."),
        )
        .with_field("name"))
    }
}

/// Enrolls a machine with an enrollment token; answers the machine's own token.
#[utoipa::path(post, path = "/v1/agents/enroll", tag = "agents", request_body = EnrollRequest,
    responses((status = 201, body = EnrollResponse), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn enroll(
    State(state): State<AppState>,
    _enroller: Enroller,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, axum::Json<EnrollResponse>), ApiError> {
    check_machine_name(&request.name)?;
    domain::check_labels(&request.labels).map_err(|error| {
        ApiError::bad_request("InvalidLabels", error.to_string()).with_field("labels")
    })?;
    let id = MachineId::new();
    let token = new_token(TokenKind::Machine);
    let machine = NewMachine {
        id,
        name: request.name,
        labels: request.labels,
        hostname: request.hostname,
        os: request.os,
        arch: request.arch,
        enrolled_at: now_millis(),
    };
    state
        .store
        .enroll_machine(&machine, &hash_token(&token))
        .await?;
    tracing::info!(machine = %id, name = %machine.name, "machine enrolled");
    Ok((
        StatusCode::CREATED,
        axum::Json(EnrollResponse {
            machine_id: id.to_string(),
            machine_token: token,
        }),
    ))
}

/// The agent's connection: a WebSocket carrying the binary agent protocol.
#[utoipa::path(get, path = "/v1/agents/connect", tag = "agents",
    responses((status = 101, description = "switching to the agent protocol"),
              (status = 401, body = ErrorBody)))]
pub(crate) async fn connect(
    State(state): State<AppState>,
    AgentMachine(machine_id): AgentMachine,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Small buffers: an idle agent should cost the server a few KiB, not the default 128 KiB.
    // Frames from agents are small (output comes in chunks of at most 64 KiB, which the
    // buffer grows for and gives back).
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(proto::agent::MAX_FRAME_BYTES)
        .on_upgrade(move |socket| gateway::session(state, machine_id, socket))
}
