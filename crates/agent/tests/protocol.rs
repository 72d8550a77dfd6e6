//! The agent against a fake server on loopback: enrollment, the protocol conversation, resume
//! after a reconnect, cancel, at-most-once, and the errors that stop the agent.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use proto::agent::{
    AgentMessage, Execute, Finished, HeldPhase, Outcome, PROTOCOL_VERSION, Resume, ServerMessage,
    Stream,
};
use proto::api::{EnrollRequest, EnrollResponse, ErrorBody, ErrorDetail};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(20);
const ENROLL_TOKEN: &str = "enroll-secret";
const MACHINE_TOKEN: &str = "machine-secret";

/// One agent connection as the fake server sees it. Dropping it closes the connection.
struct Connection {
    from_agent: mpsc::UnboundedReceiver<AgentMessage>,
    to_agent: mpsc::UnboundedSender<ServerMessage>,
}

impl Connection {
    async fn recv(&mut self) -> AgentMessage {
        tokio::time::timeout(LIMIT, self.from_agent.recv())
            .await
            .expect("a message from the agent in time")
            .expect("the agent is still connected")
    }

    fn send(&self, message: ServerMessage) {
        self.to_agent.send(message).expect("connection open");
    }

    async fn hello(&mut self) -> proto::agent::Hello {
        match self.recv().await {
            AgentMessage::Hello(hello) => hello,
            other => panic!("expected Hello, got {other:?}"),
        }
    }

    /// Waits for the first output of `execution_id`.
    async fn first_output(&mut self, execution_id: Uuid) {
        loop {
            if let AgentMessage::Output {
                execution_id: id, ..
            } = self.recv().await
                && id == execution_id
            {
                return;
            }
        }
    }

    /// Everything the agent sends about `execution_id` up to and including its Finished.
    async fn until_finished(&mut self, execution_id: Uuid) -> (Vec<AgentMessage>, Finished) {
        let mut messages = Vec::new();
        loop {
            let message = self.recv().await;
            if let AgentMessage::Finished(finished) = &message
                && finished.execution_id == execution_id
            {
                return (messages, finished.clone());
            }
            messages.push(message);
        }
    }
}

/// One stream's bytes from `Output` messages, checking that they are in order and contiguous
/// from `from`.
fn stream_bytes(
    messages: &[AgentMessage],
    execution_id: Uuid,
    wanted: Stream,
    from: u64,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    for message in messages {
        if let AgentMessage::Output {
            execution_id: id,
            stream,
            offset,
            data,
        } = message
            && *id == execution_id
            && *stream == wanted
        {
            assert_eq!(
                *offset,
                from + bytes.len() as u64,
                "output in order, no gaps"
            );
            assert!(data.len() <= proto::agent::MAX_OUTPUT_CHUNK);
            bytes.extend_from_slice(data);
        }
    }
    bytes
}

#[derive(Clone)]
struct ServerState {
    connections: mpsc::UnboundedSender<Connection>,
    enrollments: Arc<Mutex<Vec<EnrollRequest>>>,
}

struct FakeServer {
    url: String,
    connections: mpsc::UnboundedReceiver<Connection>,
    enrollments: Arc<Mutex<Vec<EnrollRequest>>>,
    _serving: JoinHandle<()>,
}

impl FakeServer {
    async fn start() -> Self {
        let (connections, accepted) = mpsc::unbounded_channel();
        let state = ServerState {
            connections,
            enrollments: Arc::default(),
        };
        let enrollments = state.enrollments.clone();
        let app = axum::Router::new()
            .route("/v1/agents/enroll", post(enroll))
            .route("/v1/agents/connect", get(connect))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let address = listener.local_addr().expect("address");
        let serving = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serves");
        });
        Self {
            url: format!("http://{address}"),
            connections: accepted,
            enrollments,
            _serving: serving,
        }
    }

    async fn connection(&mut self) -> Connection {
        tokio::time::timeout(LIMIT, self.connections.recv())
            .await
            .expect("the agent connects in time")
            .expect("server running")
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn unauthorized(code: &str, message: &str) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.to_string(),
            message: message.to_string(),
            field: None,
        },
    };
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

async fn enroll(
    State(state): State<ServerState>,
    headers: HeaderMap,
    Json(request): Json<EnrollRequest>,
) -> Response {
    if bearer(&headers) != Some(ENROLL_TOKEN) {
        return unauthorized("InvalidEnrollToken", "the enrollment token is not valid");
    }
    state
        .enrollments
        .lock()
        .expect("not poisoned")
        .push(request);
    Json(EnrollResponse {
        machine_id: Uuid::now_v7().to_string(),
        machine_token: MACHINE_TOKEN.to_string(),
    })
    .into_response()
}

async fn connect(
    State(state): State<ServerState>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if bearer(&headers) != Some(MACHINE_TOKEN) {
        return unauthorized("UnknownMachine", "unknown machine token");
    }
    upgrade.on_upgrade(move |socket| relay(socket, state.connections))
}

/// Passes decoded frames between the socket and the test.
async fn relay(mut socket: WebSocket, connections: mpsc::UnboundedSender<Connection>) {
    let (to_agent, mut outgoing) = mpsc::unbounded_channel();
    let (incoming, from_agent) = mpsc::unbounded_channel();
    if connections
        .send(Connection {
            from_agent,
            to_agent,
        })
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    let message: AgentMessage = proto::agent::decode(&bytes).expect("a valid agent frame");
                    let _ = incoming.send(message);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
            message = outgoing.recv() => match message {
                Some(message) => {
                    if socket.send(Message::Binary(proto::agent::encode(&message).into())).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
        }
    }
}

struct RunningAgent {
    state: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningAgent {
    fn start(url: &str, enroll_token: Option<&str>, state: tempfile::TempDir) -> Self {
        let config = agent::AgentConfig {
            server_url: url.to_string(),
            enroll_token: enroll_token.map(str::to_string),
            name: "web-1".to_string(),
            labels: BTreeMap::from([("env".to_string(), "test".to_string())]),
            state_dir: state.path().to_path_buf(),
            max_parallel: 4,
            kill_grace: Duration::from_millis(500),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(config, async move {
            let _ = stopped.await;
        }));
        Self {
            state,
            stop: Some(stop),
            task,
        }
    }

    fn journal_entry(&self, execution_id: Uuid) -> std::path::PathBuf {
        self.state
            .path()
            .join("journal")
            .join(execution_id.to_string())
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(LIMIT, &mut self.task)
            .await
            .expect("the agent stops in time")
            .expect("no panic")
    }

    /// Stops the agent cleanly and starts another on the same state directory.
    async fn restart(mut self, url: &str) -> Self {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(LIMIT, &mut self.task)
            .await
            .expect("the agent stops in time")
            .expect("no panic")
            .expect("a clean stop");
        RunningAgent::start(url, None, self.state)
    }

    async fn outcome(self) -> anyhow::Result<()> {
        tokio::time::timeout(LIMIT, self.task)
            .await
            .expect("the agent ends in time")
            .expect("no panic")
    }
}

fn execute(script: &str) -> Execute {
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

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[tokio::test]
async fn enrolls_runs_a_script_and_reports_it() {
    let mut server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some(ENROLL_TOKEN), state_dir());
    let mut connection = server.connection().await;

    let hello = connection.hello().await;
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.labels.get("env").map(String::as_str), Some("test"));
    assert!(
        hello.interpreters.iter().any(|name| name == "sh"),
        "{:?}",
        hello.interpreters
    );
    assert_eq!((hello.max_parallel, hello.held.len()), (4, 0));
    let enrolled = server.enrollments.lock().expect("not poisoned").clone();
    assert_eq!(enrolled.len(), 1);
    assert_eq!(
        (enrolled[0].name.as_str(), enrolled[0].os.as_str()),
        ("web-1", std::env::consts::OS)
    );

    let credential = agent.state.path().join("credential.json");
    let mode = std::fs::metadata(&credential)
        .expect("saved")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&credential).expect("readable")).expect("json");
    assert_eq!(saved["machine_token"], MACHINE_TOKEN);
    assert_eq!(saved["server_url"], server.url.as_str());

    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: Vec::new(),
    });
    connection.send(ServerMessage::Ping { nonce: 7 });
    assert_eq!(connection.recv().await, AgentMessage::Pong { nonce: 7 });

    let work = execute(r"echo out; printf '\377\000' >&2; head -c 150000 /dev/zero; exit 3");
    let id = work.execution_id;
    connection.send(ServerMessage::Execute(Box::new(work)));
    let (messages, finished) = connection.until_finished(id).await;
    assert_eq!(messages[0], AgentMessage::Accepted { execution_id: id });
    assert!(
        matches!(messages[1], AgentMessage::Started { execution_id, pid, .. } if execution_id == id && pid > 0),
        "Started comes before any output: {:?}",
        messages[1]
    );
    let stdout = stream_bytes(&messages, id, Stream::Stdout, 0);
    assert_eq!(stdout.len(), 4 + 150_000);
    assert_eq!(&stdout[..4], b"out\n");
    assert_eq!(
        stream_bytes(&messages, id, Stream::Stderr, 0),
        vec![0xff, 0x00]
    );
    assert_eq!(
        (finished.outcome, finished.exit_code),
        (Outcome::Failed, Some(3))
    );
    assert_eq!((finished.stdout_bytes, finished.stderr_bytes), (150_004, 2));
    assert!(finished.started_at.is_some());

    assert!(
        agent.journal_entry(id).exists(),
        "kept until the server acknowledges it"
    );
    connection.send(ServerMessage::Ack { execution_id: id });
    eventually("the journal entry is deleted", || {
        !agent.journal_entry(id).exists()
    })
    .await;

    agent.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn a_reconnect_resumes_output_and_forgets_what_the_server_dropped() {
    let mut server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some(ENROLL_TOKEN), state_dir());
    let go = agent.state.path().join("go");
    let mut connection = server.connection().await;
    connection.hello().await;
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: Vec::new(),
    });

    // Finished but never acknowledged; the server will not name it again.
    let dropped = execute("echo quick");
    let dropped_id = dropped.execution_id;
    connection.send(ServerMessage::Execute(Box::new(dropped)));
    connection.until_finished(dropped_id).await;

    let mut slow = execute(r#"echo first; while [ ! -e "$GO" ]; do sleep 0.05; done; echo second"#);
    slow.env.insert("GO".to_string(), go.display().to_string());
    let id = slow.execution_id;
    connection.send(ServerMessage::Execute(Box::new(slow)));
    connection.first_output(id).await;
    drop(connection);

    let mut connection = server.connection().await;
    let hello = connection.hello().await;
    let held: Vec<(Uuid, HeldPhase, bool)> = hello
        .held
        .iter()
        .map(|held| (held.execution_id, held.phase, held.started_at.is_some()))
        .collect();
    assert_eq!(
        held,
        vec![
            (dropped_id, HeldPhase::Finished, true),
            (id, HeldPhase::Running, true)
        ]
    );
    std::fs::write(&go, b"").expect("go");
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: vec![Resume {
            execution_id: id,
            stdout_offset: 2,
            stderr_offset: 0,
            cancel: false,
        }],
    });
    let (messages, finished) = connection.until_finished(id).await;
    assert!(
        !messages
            .iter()
            .any(|message| matches!(message, AgentMessage::Started { .. })),
        "the server learned of the start from Hello: {messages:?}"
    );
    assert_eq!(
        stream_bytes(&messages, id, Stream::Stdout, 2),
        b"rst\nsecond\n"
    );
    assert_eq!(
        (finished.outcome, finished.stdout_bytes),
        (Outcome::Succeeded, 13)
    );
    eventually("the dropped execution is forgotten", || {
        !agent.journal_entry(dropped_id).exists()
    })
    .await;

    agent.stop().await.expect("a clean stop");
}

/// Whether `name` is an executable file on this process's PATH, found independently of the
/// agent.
fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
    })
}

#[tokio::test]
async fn error_codes_reach_the_server_and_survive_a_restart() {
    let mut server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some(ENROLL_TOKEN), state_dir());
    let mut connection = server.connection().await;
    let hello = connection.hello().await;
    for name in ["bash", "python3", "pwsh"] {
        assert_eq!(
            hello.interpreters.iter().any(|found| found == name),
            on_path(name),
            "{name} in {:?}",
            hello.interpreters
        );
    }
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: Vec::new(),
    });

    let mut windows = execute("dir");
    windows.interpreter = Some("cmd".to_string());
    // The fake server answers 404 for a path it does not serve.
    let mut missing = execute("");
    missing.script_uri = Some(format!("{}/scripts/absent.sh?sig=SECRET", server.url));
    let mut expected = BTreeMap::new();
    for (work, code) in [
        (windows, "InterpreterNotFound"),
        (missing, "ScriptDownloadFailed"),
    ] {
        let id = work.execution_id;
        connection.send(ServerMessage::Execute(Box::new(work)));
        let (_, finished) = connection.until_finished(id).await;
        assert_eq!(
            (
                finished.outcome,
                finished.exit_code,
                finished.error_code.as_deref()
            ),
            (Outcome::Failed, None, Some(code)),
            "{:?}",
            finished.message
        );
        expected.insert(id, finished);
    }
    assert!(
        expected
            .values()
            .any(|finished| finished
                .message
                .as_deref()
                .is_some_and(|message| message.ends_with(": HTTP 404 Not Found")
                    && !message.contains("SECRET"))),
        "{expected:?}"
    );

    // Never acknowledged: a restarted agent sends the same results again.
    drop(connection);
    let agent = agent.restart(&server.url).await;
    let mut connection = server.connection().await;
    let hello = connection.hello().await;
    assert_eq!(hello.held.len(), 2);
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: expected
            .keys()
            .map(|id| Resume {
                execution_id: *id,
                stdout_offset: 0,
                stderr_offset: 0,
                cancel: false,
            })
            .collect(),
    });
    let mut resent = BTreeMap::new();
    // Bounded: the two results, and whatever else comes first.
    for _ in 0..16 {
        if resent.len() == expected.len() {
            break;
        }
        if let AgentMessage::Finished(finished) = connection.recv().await {
            resent.insert(finished.execution_id, finished);
        }
    }
    assert_eq!(resent, expected);

    agent.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn cancel_and_a_repeated_execute() {
    let mut server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some(ENROLL_TOKEN), state_dir());
    let count = agent.state.path().join("count");
    let mut connection = server.connection().await;
    connection.hello().await;
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: Vec::new(),
    });

    let mut once = execute(r#"echo ran >> "$COUNT""#);
    once.env
        .insert("COUNT".to_string(), count.display().to_string());
    let once_id = once.execution_id;
    connection.send(ServerMessage::Execute(Box::new(once.clone())));
    connection.until_finished(once_id).await;
    connection.send(ServerMessage::Execute(Box::new(once)));
    let (messages, finished) = connection.until_finished(once_id).await;
    assert_eq!(
        messages[0],
        AgentMessage::Accepted {
            execution_id: once_id
        }
    );
    assert_eq!(
        finished.outcome,
        Outcome::Succeeded,
        "the result is sent again, not rerun"
    );
    assert_eq!(std::fs::read_to_string(&count).expect("ran"), "ran\n");

    let long = execute("echo ready; sleep 300");
    let long_id = long.execution_id;
    connection.send(ServerMessage::Execute(Box::new(long)));
    connection.first_output(long_id).await;
    connection.send(ServerMessage::Cancel {
        execution_id: long_id,
    });
    let (_, finished) = connection.until_finished(long_id).await;
    assert_eq!(finished.outcome, Outcome::Canceled);

    agent.stop().await.expect("a clean stop");
}

/// A named run command's new execution names the ones it replaces: the agent stops them
/// itself and starts the new script only once they are gone; a replacement canceled while it
/// waits never starts.
#[tokio::test]
async fn a_replacement_starts_only_once_what_it_replaces_is_gone() {
    let mut server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some(ENROLL_TOKEN), state_dir());
    let mut connection = server.connection().await;
    connection.hello().await;
    connection.send(ServerMessage::Welcome {
        machine_id: Uuid::now_v7(),
        resume: Vec::new(),
    });

    // It ignores SIGTERM: only SIGKILL after the kill grace ends it.
    let stubborn = || execute("trap '' TERM; echo ready; sleep 300");
    let old = stubborn();
    let old_id = old.execution_id;
    connection.send(ServerMessage::Execute(Box::new(old)));
    connection.first_output(old_id).await;
    let mut new = execute("echo new");
    new.replaces = vec![old_id, Uuid::now_v7()];
    let new_id = new.execution_id;
    connection.send(ServerMessage::Execute(Box::new(new)));
    let (messages, finished) = connection.until_finished(new_id).await;
    assert_eq!(finished.outcome, Outcome::Succeeded);
    let position = |wanted: &dyn Fn(&AgentMessage) -> bool| {
        messages.iter().position(wanted).expect("message sent")
    };
    let old_ended = position(&|message| {
        matches!(message, AgentMessage::Finished(end)
            if end.execution_id == old_id && end.outcome == Outcome::Canceled)
    });
    let new_started = position(
        &|message| matches!(message, AgentMessage::Started { execution_id, .. } if *execution_id == new_id),
    );
    assert!(old_ended < new_started, "{messages:?}");

    let old = stubborn();
    let old_id = old.execution_id;
    connection.send(ServerMessage::Execute(Box::new(old)));
    connection.first_output(old_id).await;
    let mut canceled = execute("echo never");
    canceled.replaces = vec![old_id];
    let canceled_id = canceled.execution_id;
    connection.send(ServerMessage::Execute(Box::new(canceled)));
    connection.send(ServerMessage::Cancel {
        execution_id: canceled_id,
    });
    let (messages, finished) = connection.until_finished(canceled_id).await;
    assert_eq!(finished.outcome, Outcome::Canceled);
    assert_eq!(finished.started_at, None, "{finished:?}");
    assert!(
        !messages.iter().any(|message| matches!(message,
            AgentMessage::Started { execution_id, .. } if *execution_id == canceled_id)),
        "{messages:?}"
    );

    agent.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn a_rejected_enrollment_token_stops_the_agent() {
    let server = FakeServer::start().await;
    let agent = RunningAgent::start(&server.url, Some("not-the-token"), state_dir());
    let error = agent.outcome().await.expect_err("fatal");
    let error = format!("{error:#}");
    assert!(
        error.contains("the enrollment token is not valid"),
        "{error}"
    );
}

#[tokio::test]
async fn a_machine_the_server_forgot_stops_the_agent() {
    let server = FakeServer::start().await;
    let state = state_dir();
    write_credential(state.path(), &server.url, "a-deleted-machine");
    let agent = RunningAgent::start(&server.url, None, state);
    let error = format!("{:#}", agent.outcome().await.expect_err("fatal"));
    assert!(error.contains("does not know this machine"), "{error}");
    assert!(error.contains("credential.json"), "{error}");
}

#[tokio::test]
async fn without_a_credential_an_enrollment_token_is_needed() {
    let agent = RunningAgent::start("http://127.0.0.1:9", None, state_dir());
    let error = format!("{:#}", agent.outcome().await.expect_err("fatal"));
    assert!(error.contains("--enroll-token"), "{error}");
}

#[tokio::test]
async fn a_saved_credential_is_used_without_enrolling() {
    let mut server = FakeServer::start().await;
    let state = state_dir();
    write_credential(state.path(), &server.url, MACHINE_TOKEN);
    let agent = RunningAgent::start(&server.url, None, state);
    server.connection().await.hello().await;
    assert!(server.enrollments.lock().expect("not poisoned").is_empty());
    agent.stop().await.expect("a clean stop");
}

fn write_credential(state_dir: &Path, url: &str, token: &str) {
    let credential = serde_json::json!({
        "server_url": url,
        "machine_id": Uuid::now_v7().to_string(),
        "machine_token": token,
    });
    std::fs::write(state_dir.join("credential.json"), credential.to_string()).expect("written");
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_is_dropped_after_ninety_seconds() {
    let mut server = FakeServer::start().await;
    let state = state_dir();
    write_credential(state.path(), &server.url, MACHINE_TOKEN);
    let agent = RunningAgent::start(&server.url, None, state);
    let mut silent = server.connection().await;
    silent.hello().await;
    let quiet_since = tokio::time::Instant::now();

    // The clock is paused: it jumps to the agent's idle limit once everything waits.
    let closed = tokio::time::timeout(Duration::from_secs(300), silent.from_agent.recv()).await;
    assert!(matches!(closed, Ok(None)), "the agent hung up: {closed:?}");
    let waited = quiet_since.elapsed();
    assert!(
        waited >= Duration::from_secs(90) && waited < Duration::from_secs(91),
        "hung up after {waited:?}"
    );
    let mut next = tokio::time::timeout(Duration::from_secs(300), server.connections.recv())
        .await
        .expect("the agent reconnects")
        .expect("server running");
    next.hello().await;
    agent.stop().await.expect("a clean stop");
}
