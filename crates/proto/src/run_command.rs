//! The named run command resource, `/v1/machines/{machine}/run-commands/{name}`, in Azure's
//! shape: the property names of Azure Arc and Azure VM Run Command (camelCase), so that an
//! Azure body can be pasted as it is.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a `PUT` or `PATCH` sends: these properties, either as the whole body or inside an
/// Azure-style `{"location": ..., "properties": {...}}` wrapper (`location`, `tags`, `id`,
/// `name` and `type` around it are accepted and ignored). Unknown fields are an error.
/// Its `Debug` leaves out protected values and the password.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunCommandProperties {
    /// Where the script comes from: required by `PUT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RunCommandSource>,
    /// Exported to the script as environment variables of the same name (and substituted
    /// into `{{name}}` in an inline script).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<RunCommandParameter>>,
    /// Like `parameters`, but never returned, logged or shown again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_parameters: Option<Vec<RunCommandParameter>>,
    /// `false` (the default): the `PUT` answers once the script has ended, or after a bounded
    /// wait with `202 Accepted`. `true`: it answers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_execution: Option<bool>,
    /// Run the script as this user; the agent must run as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<String>,
    /// Accepted for Azure compatibility and then discarded: never stored, logged or
    /// returned. A Linux agent running as root switches user without a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_password: Option<String>,
    /// Execution timeout; absent or 0 means the server's default (one hour).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_in_seconds: Option<u64>,
    /// Upload the whole stdout here (HTTP PUT to a pre-signed URL) when the script ends.
    /// Replaced by each new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_blob_uri: Option<String>,
    /// The same for stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_blob_uri: Option<String>,
    /// `true`: a script that fails makes `provisioningState` `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub treat_failure_as_deployment_failure: Option<bool>,
}

impl std::fmt::Debug for RunCommandProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protected: Option<Vec<&str>> = self.protected_parameters.as_ref().map(|list| {
            list.iter()
                .map(|parameter| parameter.name.as_str())
                .collect()
        });
        f.debug_struct("RunCommandProperties")
            .field("source", &self.source)
            .field("parameters", &self.parameters)
            .field("protected_parameters", &protected)
            .field("async_execution", &self.async_execution)
            .field("run_as_user", &self.run_as_user)
            .field("timeout_in_seconds", &self.timeout_in_seconds)
            .finish_non_exhaustive()
    }
}

/// Exactly one of `script`, `scriptUri` and `commandId`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunCommandSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Fetched by the agent over HTTP(S): a pre-signed S3 URL, an OCI PAR, an Azure SAS URL.
    /// Shown without its query string, which holds the signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_uri: Option<String>,
    /// Hex SHA-256 the downloaded script must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_sha256: Option<String>,
    /// A saved command, by name. Saved commands do not exist yet: naming one is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCommandParameter {
    pub name: String,
    /// Text; a number or a boolean (as Azure's own examples send) is taken as its text.
    pub value: ParameterValue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ParameterValue {
    Text(String),
    #[schema(value_type = f64)]
    Number(serde_json::Number),
    Bool(bool),
}

impl ParameterValue {
    pub fn into_text(self) -> String {
        match self {
            ParameterValue::Text(text) => text,
            ParameterValue::Number(number) => number.to_string(),
            ParameterValue::Bool(value) => value.to_string(),
        }
    }
}

/// A named run command as `GET` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCommand {
    /// `/v1/machines/{machine}/run-commands/{name}`.
    pub id: String,
    pub name: String,
    /// The machine's name.
    pub machine: String,
    pub properties: RunCommandView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCommandView {
    pub source: RunCommandSource,
    pub parameters: Vec<RunCommandParameter>,
    /// Names only: the values are never returned.
    pub protected_parameters: Vec<ProtectedParameterName>,
    pub async_execution: bool,
    pub run_as_user: Option<String>,
    pub timeout_in_seconds: u64,
    /// Without the query string, which holds the signature.
    pub output_blob_uri: Option<String>,
    pub error_blob_uri: Option<String>,
    pub treat_failure_as_deployment_failure: bool,
    /// `Creating` or `Updating` while the `PUT` is in progress, then `Succeeded`, `Failed`
    /// or `Canceled`.
    pub provisioning_state: String,
    pub instance_view: RunCommandInstanceView,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProtectedParameterName {
    pub name: String,
}

/// How the latest run went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunCommandInstanceView {
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `TimedOut`, `Canceled` or `Unknown`.
    pub execution_state: String,
    pub execution_message: Option<String>,
    pub exit_code: Option<i32>,
    /// The last 4 KiB of stdout; the whole of it is at `outputUri`.
    pub output: String,
    /// The last 4 KiB of stderr; the whole of it is at `errorUri`.
    pub error: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    /// fleetrun's own: the run and execution behind this view, and the full output.
    pub run_id: String,
    pub execution_id: String,
    /// fleetrun's state of the execution: `pending`, `delivered`, `running`, ...
    pub state: String,
    pub error_code: Option<String>,
    pub output_uri: String,
    pub error_uri: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunCommandList {
    pub value: Vec<RunCommand>,
}
