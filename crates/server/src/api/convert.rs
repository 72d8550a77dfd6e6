//! Store records to API bodies.

use std::time::{Duration, UNIX_EPOCH};

use domain::{RunStatus, Targets, UnixMillis};
use proto::api;
use store::{ExecutionRecord, MachineRecord, RunRecord};

pub(crate) fn time(millis: UnixMillis) -> String {
    // 9999-12-31T23:59:59.999Z is the last time RFC 3339 can show.
    const LAST: i64 = 253_402_300_799_999;
    let at = UNIX_EPOCH + Duration::from_millis(millis.clamp(0, LAST) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

pub(crate) fn machine(record: MachineRecord, online: bool, now: UnixMillis) -> api::Machine {
    api::Machine {
        id: record.id.to_string(),
        name: record.name,
        labels: record.labels,
        hostname: record.hostname,
        os: record.os,
        arch: record.arch,
        agent_version: record.agent_version,
        interpreters: record.interpreters,
        status: if online { "online" } else { "offline" }.to_string(),
        enrolled_at: time(record.enrolled_at),
        last_seen_at: if online {
            Some(now)
        } else {
            record.last_seen_at
        }
        .map(time),
    }
}

pub(crate) fn targets(targets: &Targets) -> api::TargetsBody {
    match targets {
        Targets::Machines(names) => api::TargetsBody {
            machines: names.clone(),
            ..Default::default()
        },
        Targets::Selector(selector) => api::TargetsBody {
            selector: Some(selector.to_string()),
            ..Default::default()
        },
        Targets::All => api::TargetsBody {
            all: true,
            ..Default::default()
        },
    }
}

/// A URL without its query string and fragment, which hold pre-signed URLs' signatures.
pub(crate) fn without_query(uri: &str) -> String {
    uri.split(['?', '#']).next().unwrap_or_default().to_string()
}

pub(crate) fn run(record: RunRecord, executions: Option<Vec<ExecutionRecord>>) -> api::Run {
    let status = RunStatus::derive(&record.counts, record.cancel_requested);
    api::Run {
        id: record.id.to_string(),
        status: status.as_str().to_string(),
        created_at: time(record.created_at),
        finished_at: record.finished_at.map(time),
        cancel_requested: record.cancel_requested,
        counts: record
            .counts
            .iter()
            .map(|(state, count)| (state.as_str().to_string(), *count))
            .collect(),
        total: record.total,
        targets: targets(&record.targets),
        script: record.spec.script,
        interpreter: record.spec.interpreter.map(|i| i.as_str().to_string()),
        parameters: record.spec.parameters,
        env: record.spec.env,
        workdir: record.spec.workdir,
        timeout_seconds: record.spec.timeout.as_secs_f64(),
        delivery_timeout_seconds: record.spec.delivery_timeout.as_secs_f64(),
        max_concurrency: record.spec.max_concurrency.map(|limit| limit.to_string()),
        max_errors: record.spec.max_errors.map(|limit| limit.to_string()),
        stop_reason: record.stop_reason,
        output_blob_uri_set: record.spec.output_blob_uri.is_some(),
        error_blob_uri_set: record.spec.error_blob_uri.is_some(),
        protected_parameters: record.spec.protected_parameters.into_keys().collect(),
        run_as_user: record.spec.run_as_user,
        script_uri: record.spec.script_uri.as_deref().map(without_query),
        script_sha256: record.spec.script_sha256,
        executions: executions.map(|list| list.into_iter().map(execution).collect()),
    }
}

pub(crate) fn execution(record: ExecutionRecord) -> api::Execution {
    api::Execution {
        id: record.id.to_string(),
        run_id: record.run_id.to_string(),
        machine_id: record.machine_id.to_string(),
        machine_name: record.machine_name,
        state: record.state.as_str().to_string(),
        exit_code: record.exit_code,
        message: record.message,
        created_at: time(record.created_at),
        delivered_at: record.delivered_at.map(time),
        started_at: record.started_at.map(time),
        finished_at: record.finished_at.map(time),
        stdout_bytes: record.stdout_bytes,
        stderr_bytes: record.stderr_bytes,
        stdout_dropped: record.stdout_dropped,
        stderr_dropped: record.stderr_dropped,
        stdout_tail: String::from_utf8_lossy(&record.stdout_tail).into_owned(),
        stderr_tail: String::from_utf8_lossy(&record.stderr_tail).into_owned(),
        error_code: record.error_code,
    }
}
