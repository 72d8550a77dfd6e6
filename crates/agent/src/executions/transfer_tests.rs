//! Scripts from `script_uri` and output to blob URIs, against a real HTTP server on loopback
//! and real processes: what runs, what fails and how, what is uploaded, and what a restarted
//! agent does with an execution that was downloading or uploading.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::*;
use crate::test_support::{BlobServer, execute, within};

const LIMIT: Duration = Duration::from_secs(20);

/// A state directory, the agent's executions in it, and a blob server.
struct Harness {
    state: tempfile::TempDir,
    executions: Executions,
    blobs: BlobServer,
}

impl Harness {
    async fn start() -> Self {
        let state = tempfile::tempdir().expect("tempdir");
        let executions = open(state.path()).await;
        Self {
            state,
            executions,
            blobs: BlobServer::start().await,
        }
    }

    /// Accepts `execute` and waits for its result.
    async fn finish(&self, execute: Execute) -> Finished {
        let execution_id = execute.execution_id;
        assert_eq!(
            self.executions.accept(execute).await.expect("accepted"),
            Acceptance::New
        );
        finished(&self.executions, execution_id).await
    }

    fn journal(&self) -> Journal {
        Journal::open(self.state.path()).expect("journal opens")
    }

    fn stdout(&self, execution_id: Uuid) -> Vec<u8> {
        std::fs::read(self.journal().output_paths(execution_id).stdout).expect("stdout kept")
    }
}

async fn open(state_dir: &std::path::Path) -> Executions {
    let settings = Settings {
        state_dir: state_dir.to_path_buf(),
        max_parallel: 2,
        kill_grace: Duration::from_millis(500),
    };
    within(LIMIT, "opening", Executions::open(&settings))
        .await
        .expect("opens")
}

async fn finished(executions: &Executions, execution_id: Uuid) -> Finished {
    let (mut progress, _) = executions.subscribe(execution_id).expect("held");
    within(
        LIMIT,
        "finishing",
        progress.wait_for(|progress| progress.finished.is_some()),
    )
    .await
    .expect("still held")
    .finished
    .clone()
    .expect("finished")
}

/// An execution of the script at `uri`, with no inline script.
fn from_uri(uri: String) -> Execute {
    Execute {
        script_uri: Some(uri),
        ..execute("")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Asserts that nothing ran and the execution failed with `code`; returns the message.
fn failed_before_running(finished: &Finished, code: &str) -> String {
    assert_eq!(
        (
            finished.outcome,
            finished.exit_code,
            finished.started_at,
            finished.error_code.as_deref()
        ),
        (Outcome::Failed, None, None, Some(code)),
        "{:?}",
        finished.message
    );
    finished.message.clone().unwrap_or_default()
}

#[tokio::test]
async fn a_script_from_a_uri_runs() {
    let harness = Harness::start().await;
    let script = b"echo \"downloaded $FLEETRUN_EXECUTION_ID\"; echo to stderr >&2\n";
    harness.blobs.serve("hello.sh", script);

    // Directly, through a redirect, and without a Content-Length; the checksum is compared
    // without case.
    for path in [
        "/scripts/hello.sh?sig=SECRET",
        "/redirect/hello.sh",
        "/chunked/hello.sh",
    ] {
        let mut work = from_uri(harness.blobs.url(path));
        work.script_sha256 = Some(sha256_hex(script).to_uppercase());
        let execution_id = work.execution_id;
        let finished = harness.finish(work).await;
        assert_eq!(
            (finished.outcome, finished.exit_code, &finished.error_code),
            (Outcome::Succeeded, Some(0), &None),
            "{path}: {:?}",
            finished.message
        );
        assert_eq!(
            harness.stdout(execution_id),
            format!("downloaded {execution_id}\n").into_bytes(),
            "{path}"
        );
        assert_eq!(finished.stderr_bytes, 10);
    }
    assert_eq!(harness.blobs.requests("/scripts/hello.sh"), 2);
    assert_eq!(harness.blobs.requests("/redirect/hello.sh"), 1);
}

#[tokio::test]
async fn a_missing_script_fails_with_its_status() {
    let harness = Harness::start().await;
    let finished = harness
        .finish(from_uri(harness.blobs.url("/scripts/absent.sh?sig=SECRET")))
        .await;
    let message = failed_before_running(&finished, "ScriptDownloadFailed");
    assert_eq!(
        message,
        format!(
            "downloading the script from {}: HTTP 404 Not Found",
            harness.blobs.url("/scripts/absent.sh")
        )
    );

    let finished = harness
        .finish(from_uri(harness.blobs.url("/status/403?sig=SECRET")))
        .await;
    let message = failed_before_running(&finished, "ScriptDownloadFailed");
    assert!(message.ends_with(": HTTP 403 Forbidden"), "{message}");
    assert!(!message.contains("SECRET"), "{message}");
}

#[tokio::test]
async fn an_unreachable_server_fails_the_download() {
    let harness = Harness::start().await;
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let address = listener.local_addr().expect("address");
    drop(listener);
    let finished = harness
        .finish(from_uri(format!("http://{address}/script.sh?sig=SECRET")))
        .await;
    let message = failed_before_running(&finished, "ScriptDownloadFailed");
    assert!(
        message.starts_with(&format!(
            "downloading the script from http://{address}/script.sh: "
        )),
        "{message}"
    );
    assert!(message.contains("onnection refused"), "{message}");
    assert!(!message.contains("SECRET"), "{message}");
}

#[tokio::test]
async fn a_checksum_mismatch_runs_nothing() {
    let harness = Harness::start().await;
    let marker = harness.state.path().join("marker");
    let script = format!("touch '{}'\n", marker.display());
    harness.blobs.serve("touch.sh", script.as_bytes());
    let expected = sha256_hex(b"some other script");

    let mut work = from_uri(harness.blobs.url("/scripts/touch.sh"));
    work.script_sha256 = Some(expected.clone());
    let finished = harness.finish(work).await;
    let message = failed_before_running(&finished, "ScriptChecksumMismatch");
    assert!(message.contains(&expected), "{message}");
    assert!(
        message.contains(&sha256_hex(script.as_bytes())),
        "{message}"
    );
    assert!(!marker.exists(), "the script did not run");

    // The same script with the right checksum does run: the marker proves it.
    let mut work = from_uri(harness.blobs.url("/scripts/touch.sh"));
    work.script_sha256 = Some(sha256_hex(script.as_bytes()));
    let finished = harness.finish(work).await;
    assert_eq!(
        finished.outcome,
        Outcome::Succeeded,
        "{:?}",
        finished.message
    );
    assert!(marker.exists());
}

#[tokio::test]
async fn a_script_over_the_size_limit_is_refused() {
    let harness = Harness::start().await;
    let marker = harness.state.path().join("marker");
    let script = format!("touch '{}'\n# {}\n", marker.display(), "x".repeat(100));
    harness.blobs.serve("big.sh", script.as_bytes());
    let limit = script.len() as u64 - 1;
    // Refused from its Content-Length, and counted while it streams without one.
    for path in ["/scripts/big.sh", "/chunked/big.sh"] {
        let mut work = from_uri(harness.blobs.url(path));
        work.max_script_bytes = limit;
        let finished = harness.finish(work).await;
        let message = failed_before_running(&finished, "ScriptDownloadFailed");
        assert!(
            message.ends_with(&format!(": the script is larger than {limit} bytes")),
            "{message}"
        );
    }
    assert!(!marker.exists(), "the script did not run");

    let mut exact = from_uri(harness.blobs.url("/chunked/big.sh"));
    exact.max_script_bytes = script.len() as u64;
    let finished = harness.finish(exact).await;
    assert_eq!(
        finished.outcome,
        Outcome::Succeeded,
        "{:?}",
        finished.message
    );
}

#[tokio::test]
async fn output_is_uploaded_byte_for_byte() {
    let harness = Harness::start().await;
    let mut work = execute(
        r"printf '\377\000\001binary\r\n'; head -c 300000 /dev/urandom; echo done >&2; exit 3",
    );
    work.output_blob_uri = Some(harness.blobs.url("/blobs/stdout?sv=1&sig=SECRET"));
    work.error_blob_uri = Some(harness.blobs.url("/blobs/stderr?sig=OTHER"));
    let execution_id = work.execution_id;
    let finished = harness.finish(work).await;
    assert_eq!(
        (
            finished.outcome,
            finished.exit_code,
            &finished.message,
            &finished.error_code
        ),
        (Outcome::Failed, Some(3), &None, &None)
    );
    let stdout = harness.stdout(execution_id);
    assert_eq!(stdout.len(), 300_011);
    assert_eq!(finished.stdout_bytes, 300_011);

    let uploads = harness.blobs.uploads();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    for upload in &uploads {
        let (expected, query) = match upload.path.as_str() {
            "/blobs/stdout" => (stdout.clone(), "sv=1&sig=SECRET"),
            "/blobs/stderr" => (b"done\n".to_vec(), "sig=OTHER"),
            other => panic!("unexpected upload to {other}"),
        };
        assert!(upload.body == expected, "{} is byte-exact", upload.path);
        assert_eq!(upload.query.as_deref(), Some(query));
        let header = |name: &str| {
            upload
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(header("x-ms-blob-type").as_deref(), Some("BlockBlob"));
        assert_eq!(header("content-length"), Some(expected.len().to_string()));
        assert_eq!(
            header("transfer-encoding"),
            None,
            "Azure takes no chunked body"
        );
    }
}

#[tokio::test]
async fn a_refused_upload_keeps_the_outcome_and_says_why() {
    let harness = Harness::start().await;
    let mut work = execute("echo out; echo err >&2");
    work.output_blob_uri = Some(harness.blobs.url("/status/403?sig=SECRET"));
    work.error_blob_uri = Some(harness.blobs.url("/blobs/stderr?sig=SECRET"));
    let execution_id = work.execution_id;
    let finished = harness.finish(work).await;
    assert_eq!(
        (
            finished.outcome,
            finished.exit_code,
            finished.error_code.as_deref()
        ),
        (Outcome::Succeeded, Some(0), Some("OutputUploadFailed"))
    );
    assert_eq!(
        finished.message.as_deref(),
        Some(
            format!(
                "uploading stdout to {}: HTTP 403 Forbidden",
                harness.blobs.url("/status/403")
            )
            .as_str()
        )
    );
    assert_eq!(
        harness.blobs.requests("/status/403"),
        1,
        "a 403 is not retried"
    );
    // The other stream was uploaded, and fleetrun keeps the output either way.
    let uploads = harness.blobs.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].body, b"err\n");
    assert_eq!(harness.stdout(execution_id), b"out\n");
    // Recorded in the journal, for a restarted agent to send as it is.
    let status = harness
        .journal()
        .read_status(execution_id)
        .expect("status readable");
    assert_eq!(status.error_code.as_deref(), Some("OutputUploadFailed"));
    assert_eq!(status.message, finished.message);
}

#[tokio::test]
async fn a_failing_script_keeps_its_message_and_an_upload_failure_is_added() {
    let harness = Harness::start().await;
    let mut work = execute("kill -9 $$");
    work.output_blob_uri = Some(harness.blobs.url("/status/404"));
    let finished = harness.finish(work).await;
    assert_eq!(
        (
            finished.outcome,
            finished.exit_code,
            finished.error_code.as_deref()
        ),
        (Outcome::Failed, Some(137), Some("OutputUploadFailed"))
    );
    assert_eq!(
        finished.message.as_deref(),
        Some(
            format!(
                "terminated by signal 9 (SIGKILL); uploading stdout to {}: HTTP 404 Not Found",
                harness.blobs.url("/status/404")
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn an_unavailable_blob_store_is_tried_again() {
    let harness = Harness::start().await;
    let mut work = execute("echo third time lucky");
    work.output_blob_uri = Some(harness.blobs.url("/flaky/stdout"));
    let finished = harness.finish(work).await;
    assert_eq!(
        (finished.outcome, &finished.error_code),
        (Outcome::Succeeded, &None),
        "{:?}",
        finished.message
    );
    assert_eq!(harness.blobs.requests("/flaky/stdout"), 3);
    let uploads = harness.blobs.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].body, b"third time lucky\n");
}

#[tokio::test]
async fn an_unknown_interpreter_is_reported_by_code() {
    let harness = Harness::start().await;
    let mut work = execute("dir");
    work.interpreter = Some("cmd".to_string());
    work.output_blob_uri = Some(harness.blobs.url("/blobs/stdout"));
    let execution_id = work.execution_id;
    let finished = harness.finish(work).await;
    let message = failed_before_running(&finished, "InterpreterNotFound");
    assert!(message.contains("Windows-only"), "{message}");
    assert!(
        harness.blobs.uploads().is_empty(),
        "nothing ran, nothing to upload"
    );
    let status = harness
        .journal()
        .read_status(execution_id)
        .expect("status readable");
    assert_eq!(status.error_code.as_deref(), Some("InterpreterNotFound"));
}

#[tokio::test]
async fn a_cancel_stops_a_download() {
    let harness = Harness::start().await;
    let work = from_uri(harness.blobs.url("/stalled"));
    let execution_id = work.execution_id;
    harness.executions.accept(work).await.expect("accepted");
    harness.blobs.received(1).await;
    harness.executions.cancel(execution_id).await;
    let finished = finished(&harness.executions, execution_id).await;
    assert_eq!(
        (
            finished.outcome,
            finished.started_at,
            finished.message.as_deref()
        ),
        (Outcome::Canceled, None, Some("canceled before it started"))
    );
}

#[tokio::test]
async fn a_restart_while_downloading_does_not_run_the_script() {
    let harness = Harness::start().await;
    let work = from_uri(harness.blobs.url("/stalled"));
    let execution_id = work.execution_id;
    harness.executions.accept(work).await.expect("accepted");
    harness.blobs.received(1).await;

    // A second agent on the same state directory is what the agent finds after a crash now.
    let restarted = open(harness.state.path()).await;
    let finished = finished(&restarted, execution_id).await;
    assert_eq!(
        (finished.outcome, finished.started_at),
        (Outcome::Interrupted, None)
    );
    assert_eq!(
        harness.blobs.requests("/stalled"),
        1,
        "not fetched (or run) again"
    );
}

/// A journal entry whose script ended, as an agent leaves it when it dies while uploading.
fn ended_while_uploading(
    journal: &Journal,
    work: &Execute,
    stdout: &[u8],
    pending: Vec<Stream>,
) -> Status {
    journal.create(work).expect("created");
    std::fs::write(journal.output_paths(work.execution_id).stdout, stdout).expect("output");
    let mut status = Status {
        phase: HeldPhase::Running,
        pid: Some(u32::MAX - 1),
        started_at: Some(1_000),
        boot_id: journal::boot_id(),
        ..Status::queued()
    };
    status.set_result(&Finished {
        execution_id: work.execution_id,
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        message: None,
        started_at: Some(1_000),
        finished_at: 2_000,
        stdout_bytes: stdout.len() as u64,
        stderr_bytes: 0,
        stdout_dropped: 0,
        stderr_dropped: 0,
        error_code: None,
    });
    status.pending_uploads = pending;
    journal
        .write_status(work.execution_id, &status)
        .expect("written");
    status
}

#[tokio::test]
async fn a_restart_finishes_uploads_and_does_not_repeat_them() {
    let state = tempfile::tempdir().expect("tempdir");
    let blobs = BlobServer::start().await;
    let journal = Journal::open(state.path()).expect("journal opens");

    // Ended, stdout uploaded before the agent died, stderr still to go.
    let mut uploading = execute("echo never run again");
    uploading.output_blob_uri = Some(blobs.url("/blobs/stdout"));
    uploading.error_blob_uri = Some(blobs.url("/blobs/stderr"));
    ended_while_uploading(&journal, &uploading, b"kept\n", vec![Stream::Stderr]);
    std::fs::write(
        journal.output_paths(uploading.execution_id).stderr,
        b"late\n",
    )
    .expect("stderr");
    let mut status = journal
        .read_status(uploading.execution_id)
        .expect("readable");
    status.stderr_bytes = 5;
    journal
        .write_status(uploading.execution_id, &status)
        .expect("written");

    // Finished with a failed upload: sent again as it is, not uploaded again.
    let mut done = execute("echo never run again");
    done.output_blob_uri = Some(blobs.url("/blobs/done"));
    let mut done_status = ended_while_uploading(&journal, &done, b"done\n", vec![Stream::Stdout]);
    done_status.message = Some("uploading stdout to somewhere: HTTP 403 Forbidden".to_string());
    done_status.error_code = Some("OutputUploadFailed".to_string());
    let done_finished = done_status.result(done.execution_id);
    done_status.set_finished(&done_finished);
    journal
        .write_status(done.execution_id, &done_status)
        .expect("written");

    let executions = open(state.path()).await;
    let held = executions.held();
    assert!(
        held.iter().all(|held| held.started_at == Some(1_000)),
        "{held:?}"
    );

    let resumed = finished(&executions, uploading.execution_id).await;
    assert_eq!(
        (
            resumed.outcome,
            resumed.exit_code,
            resumed.started_at,
            resumed.finished_at,
            &resumed.error_code
        ),
        (Outcome::Succeeded, Some(0), Some(1_000), 2_000, &None),
        "the recorded end stands: {:?}",
        resumed.message
    );
    let uploads = blobs.uploads();
    assert_eq!(uploads.len(), 1, "only what was left: {uploads:?}");
    assert_eq!(
        (uploads[0].path.as_str(), uploads[0].body.as_slice()),
        ("/blobs/stderr", b"late\n".as_slice())
    );

    let resent = finished(&executions, done.execution_id).await;
    assert_eq!(resent, done_finished);
    assert_eq!(resent.error_code.as_deref(), Some("OutputUploadFailed"));
    assert_eq!(blobs.requests("/blobs/done"), 0);
    assert_eq!(blobs.requests("/blobs/stdout"), 0);
}

#[tokio::test]
async fn shutdown_while_uploading_leaves_the_upload_to_the_next_start() {
    let harness = Harness::start().await;
    let mut work = execute("echo out");
    work.output_blob_uri = Some(harness.blobs.url("/stalled"));
    let execution_id = work.execution_id;
    harness.executions.accept(work).await.expect("accepted");
    harness.blobs.received(1).await;
    // A cancel once the script is over changes nothing, and does not hold up the shutdown.
    harness.executions.cancel(execution_id).await;
    within(LIMIT, "shutting down", harness.executions.shutdown()).await;

    let status = harness
        .journal()
        .read_status(execution_id)
        .expect("readable");
    assert!(status.is_uploading(), "{status:?}");
    assert_eq!(status.pending_uploads, vec![Stream::Stdout]);
    assert_eq!(
        (status.outcome, status.exit_code),
        (Some(Outcome::Succeeded), Some(0))
    );
}
