//! Helpers shared by the crate's unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use proto::agent::Execute;
use uuid::Uuid;

/// An `Execute` of `script` with generous limits.
pub(crate) fn execute(script: &str) -> Execute {
    Execute {
        execution_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        script: script.to_string(),
        interpreter: None,
        env: BTreeMap::new(),
        workdir: None,
        timeout_ms: 60_000,
        output_cap_bytes: 1 << 20,
        script_uri: None,
        script_sha256: None,
        max_script_bytes: 1 << 20,
        output_blob_uri: None,
        error_blob_uri: None,
        run_as_user: None,
        replaces: Vec::new(),
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Polls `condition` until it holds, failing the test after `limit`. Only for conditions no
/// event announces, such as a process disappearing.
pub(crate) async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes of a process group that are alive (zombies excluded), read from /proc
/// independently of the code under test.
pub(crate) fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    let Ok(listing) = std::fs::read_dir("/proc") else {
        return members;
    };
    for entry in listing.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(state), Some(group)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        if group.parse() == Ok(pgid) && *state != "Z" && *state != "X" {
            members.push(pid);
        }
    }
    members
}

/// A small HTTP server on loopback standing in for S3, OCI Object Storage or Azure Blob
/// Storage: serves scripts, answers with chosen statuses, and records uploads.
///
/// - `GET /scripts/{name}`: a script put with `serve`, or 404; `GET /chunked/{name}` sends it
///   without a Content-Length; `GET /redirect/{name}` redirects to `/scripts/{name}`.
/// - `GET|PUT /stalled`: never answers.
/// - `GET|PUT /status/{code}`: answers `code`.
/// - `PUT /blobs/{name}`: records the upload and answers 201.
/// - `PUT /flaky/{name}`: answers 503 to the first two attempts, then as `/blobs`.
pub(crate) struct BlobServer {
    pub(crate) base: String,
    state: std::sync::Arc<BlobState>,
    _serving: tokio::task::JoinHandle<()>,
}

/// One PUT the server received.
#[derive(Debug, Clone)]
pub(crate) struct Upload {
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) headers: axum::http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

#[derive(Default)]
struct BlobState {
    scripts: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    uploads: std::sync::Mutex<Vec<Upload>>,
    /// Requests per path, whatever the answer.
    requests: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    /// Bumped on every request, to wait for one.
    request_count: tokio::sync::watch::Sender<u32>,
}

impl BlobState {
    fn count(&self, path: &str) -> u32 {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let count = requests.entry(path.to_string()).or_default();
        *count += 1;
        let count = *count;
        drop(requests);
        self.request_count.send_modify(|total| *total += 1);
        count
    }
}

impl BlobServer {
    pub(crate) async fn start() -> Self {
        use axum::body::{Body, Bytes};
        use axum::extract::{DefaultBodyLimit, Path, State};
        use axum::http::{HeaderMap, StatusCode, Uri, header};
        use axum::response::{IntoResponse, Response};
        use axum::routing::{get, put};
        use std::sync::Arc;

        type Shared = State<Arc<BlobState>>;

        fn script(state: &BlobState, name: &str) -> Option<Vec<u8>> {
            let scripts = state.scripts.lock().unwrap_or_else(|e| e.into_inner());
            scripts.get(name).cloned()
        }
        async fn scripts(State(state): Shared, Path(name): Path<String>, uri: Uri) -> Response {
            state.count(uri.path());
            match script(&state, &name) {
                Some(bytes) => bytes.into_response(),
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
        async fn chunked(State(state): Shared, Path(name): Path<String>, uri: Uri) -> Response {
            state.count(uri.path());
            let Some(bytes) = script(&state, &name) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                bytes.chunks(7).map(|chunk| Ok(chunk.to_vec())).collect();
            Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
        async fn redirect(State(state): Shared, Path(name): Path<String>, uri: Uri) -> Response {
            state.count(uri.path());
            (
                StatusCode::FOUND,
                [(header::LOCATION, format!("/scripts/{name}"))],
            )
                .into_response()
        }
        async fn stalled(State(state): Shared, uri: Uri) -> Response {
            state.count(uri.path());
            std::future::pending().await
        }
        async fn status(State(state): Shared, Path(code): Path<u16>, uri: Uri) -> Response {
            state.count(uri.path());
            StatusCode::from_u16(code)
                .unwrap_or(StatusCode::IM_A_TEAPOT)
                .into_response()
        }
        fn record(state: &BlobState, uri: &Uri, headers: HeaderMap, body: Bytes) -> Response {
            let upload = Upload {
                path: uri.path().to_string(),
                query: uri.query().map(str::to_string),
                headers,
                body: body.to_vec(),
            };
            let mut uploads = state.uploads.lock().unwrap_or_else(|e| e.into_inner());
            uploads.push(upload);
            StatusCode::CREATED.into_response()
        }
        async fn blobs(
            State(state): Shared,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            state.count(uri.path());
            record(&state, &uri, headers, body)
        }
        async fn flaky(
            State(state): Shared,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            if state.count(uri.path()) <= 2 {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            record(&state, &uri, headers, body)
        }

        let state = Arc::new(BlobState::default());
        let app = axum::Router::new()
            .route("/scripts/{name}", get(scripts))
            .route("/chunked/{name}", get(chunked))
            .route("/redirect/{name}", get(redirect))
            .route("/stalled", get(stalled).put(stalled))
            .route("/status/{code}", get(status).put(status))
            .route("/blobs/{name}", put(blobs))
            .route("/flaky/{name}", put(flaky))
            .layer(DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let address = listener.local_addr().expect("address");
        let serving = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serves");
        });
        Self {
            base: format!("http://{address}"),
            state,
            _serving: serving,
        }
    }

    /// Serves `script` at `/scripts/{name}` (and the other script routes).
    pub(crate) fn serve(&self, name: &str, script: &[u8]) {
        let mut scripts = self.state.scripts.lock().unwrap_or_else(|e| e.into_inner());
        scripts.insert(name.to_string(), script.to_vec());
    }

    /// `base` + `path_and_query`.
    pub(crate) fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    pub(crate) fn uploads(&self) -> Vec<Upload> {
        let uploads = self.state.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads.clone()
    }

    /// Requests received for `path`, whatever the answer.
    pub(crate) fn requests(&self, path: &str) -> u32 {
        let requests = self
            .state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        requests.get(path).copied().unwrap_or(0)
    }

    /// Waits until at least `count` requests have arrived in all.
    pub(crate) async fn received(&self, count: u32) {
        let mut total = self.state.request_count.subscribe();
        within(
            Duration::from_secs(20),
            "requests to the blob server",
            total.wait_for(|total| *total >= count),
        )
        .await
        .expect("server running");
    }
}
