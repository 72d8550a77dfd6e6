//! The REST API's request and response bodies (JSON under `/v1`).
//!
//! Times are RFC 3339 strings in UTC. Output tails are shown as UTF-8 with invalid sequences
//! replaced; the output endpoints return the exact bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error the API returns has this shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `ScriptTooLarge`, `MachineNotFound`, ...
    pub code: String,
    /// A sentence for a person.
    pub message: String,
    /// The request field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    /// Interpreters found on the machine's PATH.
    pub interpreters: Vec<String>,
    /// `online` while the agent is connected, else `offline`.
    pub status: String,
    pub enrolled_at: String,
    /// When the agent was last connected (now, while it is online).
    pub last_seen_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: Vec<Machine>,
}

/// A duration: a number of seconds, or text such as `90s`, `5m`, `1h30m`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(u64),
    Text(String),
}

/// A count (`10`) or a percentage of the run's targets (`"25%"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LimitValue {
    Count(u64),
    Text(String),
}

impl LimitValue {
    pub fn into_text(self) -> String {
        match self {
            LimitValue::Count(count) => count.to_string(),
            LimitValue::Text(text) => text,
        }
    }
}

impl DurationValue {
    pub fn into_text(self) -> String {
        match self {
            DurationValue::Seconds(seconds) => seconds.to_string(),
            DurationValue::Text(text) => text,
        }
    }
}

/// The machines a run is aimed at: exactly one of `machines`, `selector` and `all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetsBody {
    /// Machine names or ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// A label selector: `env=prod,role=web`, `env!=dev`, `gpu` (present), `!gpu` (absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Every enrolled machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// Its `Debug` leaves out the protected parameters' values.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    pub targets: TargetsBody,
    /// The script. `{{name}}` is replaced by parameter `name`. Leave it out with
    /// `script_uri`.
    #[serde(default)]
    pub script: String,
    /// Program to run the script with. Default: the script's `#!` line, else bash, else sh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    /// Substituted into `{{name}}` and exported as environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory on the machine. Default: a fresh directory per execution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Execution timeout. Default one hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationValue>,
    /// How long to wait for an offline machine to connect. Default ten minutes. With
    /// `max_concurrency`, counted from when an execution is released to its machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_timeout: Option<DurationValue>,
    /// Most executions in flight at once across the run: a count or a percentage of the
    /// targets. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<LimitValue>,
    /// Failures allowed before the executions not yet sent are skipped: a count or a
    /// percentage of the targets. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_errors: Option<LimitValue>,
    /// Fetch the script from this HTTP(S) URL on the machine (a pre-signed S3 URL, an OCI
    /// PAR, an Azure SAS URL) instead of giving `script`. It is not templated: parameters
    /// reach it as environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_uri: Option<String>,
    /// Hex SHA-256 the downloaded script must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_sha256: Option<String>,
    /// When each execution ends, its whole stdout is uploaded here with an HTTP PUT (a
    /// pre-signed URL; `x-ms-blob-type: BlockBlob` is sent for Azure). fleetrun keeps it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_uri: Option<String>,
    /// The same for stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_blob_uri: Option<String>,
    /// Exported as environment variables (and substituted into `{{name}}`) like
    /// `parameters`, but never returned, logged or shown again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub protected_parameters: BTreeMap<String, String>,
    /// Run the script as this user. The agent must run as root to switch users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<String>,
}

impl std::fmt::Debug for CreateRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRun")
            .field("targets", &self.targets)
            .field("script", &self.script)
            .field("parameters", &self.parameters)
            .field(
                "protected_parameters",
                &self.protected_parameters.keys().collect::<Vec<_>>(),
            )
            .field("run_as_user", &self.run_as_user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: String,
    /// `pending`, `in_progress`, `succeeded`, `failed` or `canceled`.
    pub status: String,
    pub created_at: String,
    /// When the last execution ended.
    pub finished_at: Option<String>,
    pub cancel_requested: bool,
    /// Executions by state.
    pub counts: BTreeMap<String, u64>,
    pub total: u64,
    /// How the targets were named.
    pub targets: TargetsBody,
    pub script: String,
    pub interpreter: Option<String>,
    pub parameters: BTreeMap<String, String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout_seconds: f64,
    pub delivery_timeout_seconds: f64,
    pub max_concurrency: Option<String>,
    pub max_errors: Option<String>,
    /// Why rate control stopped sending the rest of the run (max_errors reached).
    pub stop_reason: Option<String>,
    /// Shown without its query string, which holds a pre-signed URL's signature.
    pub script_uri: Option<String>,
    pub script_sha256: Option<String>,
    /// Upload destinations are pre-signed URLs, which are secrets: only whether one is set is
    /// shown.
    pub output_blob_uri_set: bool,
    pub error_blob_uri_set: bool,
    /// The names of the protected parameters; their values are never returned.
    #[serde(default)]
    pub protected_parameters: Vec<String>,
    #[serde(default)]
    pub run_as_user: Option<String>,
    /// Present on a single run's detail, absent in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executions: Option<Vec<Execution>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunList {
    pub runs: Vec<Run>,
    /// Pass as `before` for the next, older page; absent on the last page.
    pub next_before: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Execution {
    pub id: String,
    pub run_id: String,
    pub machine_id: String,
    pub machine_name: String,
    /// `pending`, `delivered`, `running`, `succeeded`, `failed`, `timed_out`, `canceled`,
    /// `delivery_timed_out`, `skipped` or `interrupted`.
    pub state: String,
    pub exit_code: Option<i32>,
    /// Why it ended as it did, when the state and exit code do not say it all.
    pub message: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Bytes beyond the output cap, not kept.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// The last 4 KiB of each stream (UTF-8, invalid bytes replaced).
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// A stable name for what went wrong beyond the exit code: `InterpreterNotFound`,
    /// `ScriptDownloadFailed`, `ScriptChecksumMismatch`, `OutputUploadFailed`, `Interrupted`.
    pub error_code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub arch: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnrollResponse {
    pub machine_id: String,
    /// The machine's credential for `/v1/agents/connect`. Shown once.
    pub machine_token: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// Server-sent event `execution` of `GET /v1/runs/{run}/events`: one execution changed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecutionEvent {
    pub id: String,
    pub run_id: String,
    pub state: String,
    /// The state before, so that a client can keep counts without a table of its own.
    pub previous_state: String,
    pub exit_code: Option<i32>,
}
