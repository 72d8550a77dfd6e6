//! `ApiError`: the one error type handlers return, rendered as
//! `{"error":{"code","message","field"}}`, and the extractors that turn malformed requests into
//! it.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use domain::ValidationError;
use proto::api::{ErrorBody, ErrorDetail};
use store::StoreError;

#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub(crate) fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// Internal failures are logged here and reported without their details.
    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            "internal error; the server log has the details",
        )
    }
}

impl From<ValidationError> for ApiError {
    fn from(error: ValidationError) -> Self {
        let status = match error.code {
            "MachineNotFound" => StatusCode::NOT_FOUND,
            "NoMatchingMachines" => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            code: error.code,
            message: error.message,
            field: Some(error.field),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NameTaken(name) => ApiError::new(
                StatusCode::CONFLICT,
                "MachineNameTaken",
                format!(
                    "a machine named `{name}` is already enrolled: choose another name, or delete \
                     the old machine first (fleetrun machines delete {name})"
                ),
            )
            .with_field("name"),
            other => ApiError::internal(other),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(error: std::io::Error) -> Self {
        ApiError::internal(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Splits serde's "path: problem" text into the field and the message.
fn field_of(detail: &str) -> Option<String> {
    let (path, _) = detail.split_once(": ")?;
    let plain = !path.is_empty() && !path.contains(' ');
    plain.then(|| path.to_string())
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let text = rejection.body_text();
        let detail = text
            .strip_prefix("Failed to deserialize the JSON body into the target type: ")
            .unwrap_or(&text)
            .to_string();
        // 415 without a JSON content type, 413 for a body over the size limit, else 400.
        let status = match rejection.status() {
            status @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => status,
            _ => StatusCode::BAD_REQUEST,
        };
        let field = field_of(&detail).or_else(|| {
            // "unknown field `x`" and "missing field `x`" name the field in backticks.
            let start = detail.find("field `")? + 7;
            let end = detail[start..].find('`')? + start;
            Some(detail[start..end].to_string())
        });
        // serde quotes the value it could not take: not when that value is a secret.
        let message = match &field {
            Some(field) if field.starts_with("protected_parameters") => format!(
                "the request body is not valid: {field}: not a valid value (it is not shown: \
                 it is a secret)"
            ),
            _ => format!("the request body is not valid: {detail}"),
        };
        ApiError {
            status,
            code: "InvalidBody",
            message,
            field,
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        let text = rejection.body_text();
        let detail = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text)
            .to_string();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "InvalidQuery",
            field: field_of(&detail),
            message: format!("the query string is not valid: {detail}"),
        }
    }
}

/// `axum::Json`, with malformed bodies reported as `ApiError`.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub(crate) struct ApiJson<T>(pub(crate) T);

/// `axum::extract::Query`, with malformed query strings reported as `ApiError`.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub(crate) struct ApiQuery<T>(pub(crate) T);
