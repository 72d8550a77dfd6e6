//! Script sources and output destinations through the whole stack: a run names a script URI
//! and upload URLs, the server passes them on, the agent fetches and uploads, and the
//! execution reports what went wrong by code.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::Cluster;

/// What the little HTTP server received: method, path, headers, body.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A loopback HTTP server for these tests: `GET /script.sh` serves a script, `GET` of anything
/// else is 404, `PUT /upload/...` is stored and answered 201, `PUT /forbidden` is 403. It
/// stops after a bounded time.
struct BlobServer {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    _thread: JoinHandle<()>,
}

impl BlobServer {
    fn start(script: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, script, &log),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            url,
            received,
            _thread: thread,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

fn serve(stream: TcpStream, script: &str, log: &Mutex<Vec<Received>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let (status, answer): (&str, &[u8]) = match (method.as_str(), path.as_str()) {
        ("GET", "/script.sh") => ("200 OK", script.as_bytes()),
        ("PUT", path) if path.starts_with("/upload/") => ("201 Created", b""),
        ("PUT", _) => ("403 Forbidden", b"no"),
        _ => ("404 Not Found", b"missing"),
    };
    log.lock().expect("lock").push(Received {
        method,
        path,
        headers,
        body,
    });
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = stream.write_all(answer);
}

#[test]
fn a_script_from_a_uri_runs_and_its_output_is_uploaded() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let blobs = BlobServer::start(
        "#!/bin/sh\nprintf 'from the uri %s\\n' \"$who\"\nprintf 'warn\\377' >&2\n",
    );
    let output = cluster.fleetrun(&[
        "run",
        "-m",
        "web-1",
        "--script-uri",
        &format!("{}/script.sh", blobs.url),
        "--param",
        "who=world",
        "--output-blob-uri",
        &format!("{}/upload/out?sig=secret", blobs.url),
        "--error-blob-uri",
        &format!("{}/upload/err?sig=secret", blobs.url),
    ]);
    assert_eq!(output.success(), "from the uri world\n");
    let uploads: Vec<Received> = blobs
        .received()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    let out = uploads
        .iter()
        .find(|r| r.path.starts_with("/upload/out"))
        .expect("stdout uploaded");
    assert_eq!(out.body, b"from the uri world\n");
    assert_eq!(
        out.headers.get("x-ms-blob-type").map(String::as_str),
        Some("BlockBlob")
    );
    let err = uploads
        .iter()
        .find(|r| r.path.starts_with("/upload/err"))
        .expect("stderr uploaded");
    assert_eq!(err.body, b"warn\xff", "uploads are byte-exact");

    let run = cluster.get_json(&format!("/v1/runs/{}", cluster.newest_run_id()));
    assert_eq!(run["output_blob_uri_set"], true, "{run}");
    assert!(
        !run.to_string().contains("sig=secret"),
        "a pre-signed URL is never shown: {run}"
    );
}

#[test]
fn download_and_upload_failures_are_named() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let blobs = BlobServer::start("echo never\n");

    let run = cluster.create_run(json!({
        "targets": {"machines": ["web-1"]},
        "script_uri": format!("{}/missing.sh", blobs.url)
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    let execution = &run["executions"][0];
    assert_eq!(execution["state"], "failed", "{run}");
    assert_eq!(execution["error_code"], "ScriptDownloadFailed", "{run}");
    assert!(
        execution["message"].as_str().unwrap_or("").contains("404"),
        "{run}"
    );

    let run = cluster.create_run(json!({
        "targets": {"machines": ["web-1"]},
        "script_uri": format!("{}/script.sh", blobs.url),
        "script_sha256": "0".repeat(64)
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    assert_eq!(
        run["executions"][0]["error_code"], "ScriptChecksumMismatch",
        "{run}"
    );
    assert_eq!(
        run["executions"][0]["stdout_bytes"], 0,
        "nothing ran: {run}"
    );

    let run = cluster.create_run(json!({
        "targets": {"machines": ["web-1"]},
        "script": "echo kept",
        "output_blob_uri": format!("{}/forbidden?sig=secret", blobs.url)
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    let execution = &run["executions"][0];
    assert_eq!(
        execution["state"], "succeeded",
        "a failed upload does not fail the script: {run}"
    );
    assert_eq!(execution["error_code"], "OutputUploadFailed", "{run}");
    assert!(
        execution["message"].as_str().unwrap_or("").contains("403"),
        "{run}"
    );
    assert!(!run.to_string().contains("secret"), "{run}");
    assert_eq!(
        execution["stdout_tail"], "kept\n",
        "fleetrun keeps the output anyway: {run}"
    );
}

#[test]
fn bad_sources_and_reserved_parameters_are_refused() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let before = cluster.run_count();
    for (body, code, field) in [
        (
            json!({"targets": {"all": true}, "script_uri": "ftp://host/x.sh"}),
            "InvalidUri",
            "script_uri",
        ),
        (
            json!({"targets": {"all": true}, "script": "true", "script_uri": "http://h/x"}),
            "ConflictingScript",
            "script_uri",
        ),
        (
            json!({"targets": {"all": true}, "script_uri": "http://h/x", "script_sha256": "beef"}),
            "InvalidScriptSha256",
            "script_sha256",
        ),
        (
            json!({"targets": {"all": true}, "script": "true", "error_blob_uri": "nope"}),
            "InvalidUri",
            "error_blob_uri",
        ),
        (
            json!({"targets": {"all": true}, "script": "echo $PATH", "parameters": {"PATH": "/x"}}),
            "ReservedParameterName",
            "parameters.PATH",
        ),
    ] {
        let (status, error) = cluster.post_json("/v1/runs", &body);
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(
            (
                error["error"]["code"].as_str(),
                error["error"]["field"].as_str()
            ),
            (Some(code), Some(field)),
            "{error}"
        );
    }
    assert_eq!(cluster.run_count(), before);
}
