//! Bearer tokens: 32 random bytes shown once, stored only as their SHA-256, and the extractors
//! that admit operators and agents.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use domain::MachineId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use store::TokenKind;

use crate::AppState;
use crate::error::ApiError;

/// A new random token. The prefix says what it is for, which helps people and secret scanners.
pub(crate) fn new_token(kind: TokenKind) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let prefix = match kind {
        TokenKind::Admin => "fra_",
        TokenKind::Enroll => "fre_",
        TokenKind::Machine => "frm_",
    };
    format!("{prefix}{}", hex::encode(bytes))
}

pub(crate) fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
        })?;
    let text = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
    text.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))
}

async fn token_of_kind(
    parts: &Parts,
    state: &AppState,
    kind: TokenKind,
) -> Result<Option<MachineId>, ApiError> {
    let token = bearer(parts)?;
    match state.store.find_token(&hash_token(token)).await? {
        Some(record) if record.kind == kind => Ok(record.machine_id),
        _ => Err(ApiError::unauthorized("invalid token")),
    }
}

/// An operator with an admin token.
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        token_of_kind(parts, state, TokenKind::Admin).await?;
        Ok(Admin)
    }
}

/// A caller holding an enrollment token.
pub(crate) struct Enroller;

impl FromRequestParts<AppState> for Enroller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        token_of_kind(parts, state, TokenKind::Enroll).await?;
        Ok(Enroller)
    }
}

/// An agent, authenticated as its machine.
pub(crate) struct AgentMachine(pub(crate) MachineId);

impl FromRequestParts<AppState> for AgentMachine {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        token_of_kind(parts, state, TokenKind::Machine)
            .await?
            .map(AgentMachine)
            .ok_or_else(|| ApiError::unauthorized("invalid token"))
    }
}
