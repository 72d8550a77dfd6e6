//! Enrolls the machine, keeps one outbound WebSocket to the server (reconnecting with backoff),
//! speaks the agent protocol over it, and ships each execution's output and result.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::future::Future;
use std::io::{self, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use futures_util::{Sink, SinkExt, StreamExt};
use proto::agent::{
    AgentMessage, HeldExecution, Hello, MAX_FRAME_BYTES, MAX_OUTPUT_CHUNK, PROTOCOL_VERSION,
    ServerMessage, Stream,
};
use proto::api::{EnrollRequest, EnrollResponse, ErrorBody};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use uuid::Uuid;

use crate::AgentConfig;
use crate::executions::{Acceptance, Executions, Progress};
use crate::executor::{KNOWN_INTERPRETERS, find_program};
use crate::journal::OutputPaths;

const CREDENTIAL_FILE: &str = "credential.json";
/// The server pings every 30 s; three missed pings mean the connection is dead even if TCP has
/// not noticed.
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Messages waiting for the socket. With output chunks of at most 64 KiB this bounds what one
/// connection buffers to about 2 MiB, and a slow network slows the shippers down instead.
const OUTBOX_MESSAGES: usize = 32;
/// WebSocket read and write buffers: small, as the agent sends little and receives less.
const SOCKET_BUFFER_BYTES: usize = 8 * 1024;
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping agent waits for its Close frame to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why talking to the server stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// Retrying cannot help: the agent stops with this error.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    /// The network or the server is having trouble: try again after a backoff.
    #[error("{0:#}")]
    Transient(anyhow::Error),
}

/// Exponential backoff with full jitter: each delay is drawn uniformly from zero to a ceiling
/// that doubles from 200 ms up to 10 s, so that a fleet that lost its server does not come
/// back in lockstep.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    const FIRST_CEILING: Duration = Duration::from_millis(200);
    const LAST_CEILING: Duration = Duration::from_secs(10);
    /// A connection that lived this long was a good one: the next failure starts over.
    pub(crate) const STABLE_AFTER: Duration = Duration::from_secs(10);

    pub(crate) fn ceiling(&self) -> Duration {
        let doubled = Self::FIRST_CEILING.saturating_mul(1_u32 << self.attempt.min(16));
        doubled.min(Self::LAST_CEILING)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What the agent keeps after enrolling: `<state_dir>/credential.json`, mode 0600.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Credential {
    pub(crate) server_url: String,
    pub(crate) machine_id: String,
    pub(crate) machine_token: String,
}

/// Talks to the server until `shutdown` resolves or a fatal failure.
pub(crate) async fn serve(
    config: &AgentConfig,
    executions: &Executions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let connect_url = connect_url(&config.server_url)?;
    let mut backoff = Backoff::default();
    let credential = tokio::select! {
        () = &mut shutdown => return Ok(()),
        credential = obtain_credential(config, &mut backoff) => credential?,
    };
    if credential.server_url != config.server_url {
        tracing::warn!(
            enrolled_with = %credential.server_url,
            connecting_to = %config.server_url,
            "this machine was enrolled with a different server url"
        );
    }
    backoff.reset();
    loop {
        let connected_at = Instant::now();
        let ended = session(
            config,
            &connect_url,
            &credential,
            executions,
            &mut backoff,
            &mut shutdown,
        )
        .await;
        match ended {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Closed) => tracing::info!("disconnected from the server"),
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Transient(error)) => {
                tracing::warn!(error = %format!("{error:#}"), "lost the connection to the server");
            }
        }
        if connected_at.elapsed() > Backoff::STABLE_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn base_url(server_url: &str) -> &str {
    server_url.trim_end_matches('/')
}

/// `http://host/...` becomes `ws://host/.../v1/agents/connect`, `https` becomes `wss`.
pub(crate) fn connect_url(server_url: &str) -> anyhow::Result<String> {
    let base = base_url(server_url);
    if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}/v1/agents/connect"))
    } else if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}/v1/agents/connect"))
    } else {
        Err(anyhow!(
            "the server url `{server_url}` must start with http:// or https://"
        ))
    }
}

fn credential_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CREDENTIAL_FILE)
}

/// The saved credential, or a new one from enrolling with the enrollment token.
async fn obtain_credential(
    config: &AgentConfig,
    backoff: &mut Backoff,
) -> anyhow::Result<Credential> {
    if let Some(credential) = load_credential(&config.state_dir)? {
        return Ok(credential);
    }
    let Some(enroll_token) = &config.enroll_token else {
        return Err(anyhow!(
            "this machine is not enrolled yet ({} does not exist): pass --enroll-token with an \
             enrollment token from the server",
            credential_path(&config.state_dir).display()
        ));
    };
    let http = reqwest::Client::builder()
        .timeout(ENROLL_TIMEOUT)
        .build()
        .context("building the http client")?;
    loop {
        match enroll(&http, config, enroll_token).await {
            Ok(enrolled) => {
                let credential = Credential {
                    server_url: config.server_url.clone(),
                    machine_id: enrolled.machine_id,
                    machine_token: enrolled.machine_token,
                };
                let state_dir = config.state_dir.clone();
                let saved = credential.clone();
                tokio::task::spawn_blocking(move || save_credential(&state_dir, &saved))
                    .await
                    .context("saving the credential")??;
                tracing::info!(machine_id = %credential.machine_id, name = %config.name, "enrolled with the server");
                return Ok(credential);
            }
            Err(Failure::Fatal(error)) => return Err(error),
            Err(Failure::Transient(error)) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %format!("{error:#}"), retry_in = ?delay, "could not enroll with the server");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn enroll(
    http: &reqwest::Client,
    config: &AgentConfig,
    enroll_token: &str,
) -> Result<EnrollResponse, Failure> {
    let url = format!("{}/v1/agents/enroll", base_url(&config.server_url));
    let request = EnrollRequest {
        name: config.name.clone(),
        labels: config.labels.clone(),
        hostname: hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
    };
    let response = http
        .post(&url)
        .bearer_auth(enroll_token)
        .json(&request)
        .send()
        .await
        .with_context(|| format!("sending the enrollment request to {url}"))
        .map_err(Failure::Transient)?;
    let status = response.status();
    if status.is_success() {
        return response
            .json::<EnrollResponse>()
            .await
            .context("reading the enrollment answer")
            .map_err(Failure::Transient);
    }
    let body = response.bytes().await.unwrap_or_default();
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(error) => format!("{} ({})", error.error.message, error.error.code),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
    };
    if status.is_client_error() {
        Err(Failure::Fatal(anyhow!(
            "the server refused to enroll this machine ({status}): {message}"
        )))
    } else {
        Err(Failure::Transient(anyhow!(
            "the server failed to enroll this machine ({status}): {message}"
        )))
    }
}

fn load_credential(state_dir: &Path) -> anyhow::Result<Option<Credential>> {
    let path = credential_path(state_dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).with_context(|| {
        format!(
            "{} is not a valid credential: remove it and enroll again",
            path.display()
        )
    })
}

/// Writes the credential atomically and readable by its owner only.
pub(crate) fn save_credential(state_dir: &Path, credential: &Credential) -> anyhow::Result<()> {
    let path = credential_path(state_dir);
    let temporary = state_dir.join(format!("{CREDENTIAL_FILE}.tmp"));
    let contents = serde_json::to_vec_pretty(credential).context("encoding the credential")?;
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        // The mode above applies only to a new file; a leftover one is tightened too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(&contents)?;
        file.sync_all()?;
        fs::rename(&temporary, &path)?;
        fs::File::open(state_dir)?.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default()
}

fn hello(config: &AgentConfig, executions: &Executions) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: hostname(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        labels: config.labels.clone(),
        interpreters: KNOWN_INTERPRETERS
            .iter()
            .filter(|name| find_program(name).is_some())
            .map(|name| (*name).to_string())
            .collect(),
        max_parallel: executions.max_parallel(),
        held: executions.held(),
    }
}

/// A task that is stopped when its handle is dropped, so that nothing a connection started
/// outlives it.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a connection ended without failing.
enum Ended {
    /// The server closed it.
    Closed,
    /// The agent is stopping; the server was told with a Close frame.
    Shutdown,
}

/// One connection, from connect to disconnect.
async fn session(
    config: &AgentConfig,
    connect_url: &str,
    credential: &Credential,
    executions: &Executions,
    backoff: &mut Backoff,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Ended, Failure> {
    let mut request = connect_url
        .into_client_request()
        .with_context(|| format!("building a request for {connect_url}"))
        .map_err(Failure::Fatal)?;
    let authorization = HeaderValue::from_str(&format!("Bearer {}", credential.machine_token))
        .context("the saved machine token is not a valid header value")
        .map_err(Failure::Fatal)?;
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, authorization);
    let socket_config = WebSocketConfig::default()
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(SOCKET_BUFFER_BYTES)
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let connecting =
        tokio_tungstenite::connect_async_with_config(request, Some(socket_config), true);
    let connected = tokio::select! {
        () = &mut *shutdown => return Ok(Ended::Shutdown),
        connected = connecting => connected,
    };
    let socket = match connected {
        Ok((socket, _response)) => socket,
        Err(tungstenite::Error::Http(response))
            if response.status() == StatusCode::UNAUTHORIZED =>
        {
            return Err(Failure::Fatal(anyhow!(
                "the server does not know this machine any more (was it deleted?): remove {} and \
                 enroll again",
                credential_path(&config.state_dir).display()
            )));
        }
        Err(error) => {
            return Err(Failure::Transient(
                anyhow!(error).context(format!("connecting to {connect_url}")),
            ));
        }
    };
    tracing::info!(server = %connect_url, "connected to the server");

    let (sink, mut frames) = socket.split();
    let (outbox, outgoing) = mpsc::channel(OUTBOX_MESSAGES);
    let (close, closing) = oneshot::channel();
    let mut writer = AbortOnDrop(tokio::spawn(write_frames(sink, outgoing, closing)));
    let hello = hello(config, executions);
    let mut conversation = Conversation {
        executions,
        outbox,
        hello_held: hello.held.clone(),
        shippers: HashMap::new(),
        backoff,
    };
    conversation.send(AgentMessage::Hello(hello)).await?;

    loop {
        let frame = tokio::select! {
            () = &mut *shutdown => {
                // Say goodbye properly, but do not let a stuck network hold the agent up.
                let _ = close.send(());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer.0).await;
                return Ok(Ended::Shutdown);
            }
            frame = tokio::time::timeout(IDLE_LIMIT, frames.next()) => frame,
            written = &mut writer.0 => {
                let error = match written {
                    Ok(Ok(())) => anyhow!("the connection closed"),
                    Ok(Err(error)) => error,
                    Err(error) => anyhow!(error),
                };
                return Err(Failure::Transient(error.context("sending to the server")));
            }
        };
        let message = match frame {
            Err(_) => {
                return Err(Failure::Transient(anyhow!(
                    "nothing arrived from the server for {} s",
                    IDLE_LIMIT.as_secs()
                )));
            }
            Ok(None) => return Ok(Ended::Closed),
            Ok(Some(Err(error))) => {
                return Err(Failure::Transient(
                    anyhow!(error).context("reading from the server"),
                ));
            }
            Ok(Some(Ok(message))) => message,
        };
        match message {
            Message::Binary(bytes) => match proto::agent::decode::<ServerMessage>(&bytes) {
                Ok(message) => conversation.handle(message).await?,
                // A newer server may send messages this agent does not know; skipping them
                // keeps the conversation going.
                Err(error) => tracing::warn!(%error, "ignoring a frame from the server"),
            },
            Message::Close(_) => return Ok(Ended::Closed),
            // WebSocket pings are answered by tungstenite; text is not part of the protocol.
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

async fn write_frames(
    mut sink: impl Sink<Message, Error = tungstenite::Error> + Unpin,
    mut outgoing: mpsc::Receiver<AgentMessage>,
    mut closing: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    loop {
        let message = tokio::select! {
            _ = &mut closing => break,
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        sink.send(Message::Binary(proto::agent::encode(&message).into()))
            .await
            .context("writing a frame")?;
    }
    // Best effort: the connection is going away either way.
    let _ = sink.close().await;
    Ok(())
}

/// The state of one connection's conversation.
struct Conversation<'a> {
    executions: &'a Executions,
    outbox: mpsc::Sender<AgentMessage>,
    /// What `Hello` said this agent holds: the `Welcome` is an answer to exactly that.
    hello_held: Vec<HeldExecution>,
    shippers: HashMap<Uuid, AbortOnDrop<()>>,
    backoff: &'a mut Backoff,
}

impl Conversation<'_> {
    async fn send(&self, message: AgentMessage) -> Result<(), Failure> {
        self.outbox
            .send(message)
            .await
            .map_err(|_| Failure::Transient(anyhow!("the connection's writer stopped")))
    }

    async fn handle(&mut self, message: ServerMessage) -> Result<(), Failure> {
        match message {
            ServerMessage::Welcome { machine_id, resume } => {
                self.backoff.reset();
                tracing::info!(%machine_id, resumed = resume.len(), "the server welcomed this agent");
                let wanted: HashSet<Uuid> =
                    resume.iter().map(|resume| resume.execution_id).collect();
                for held in &self.hello_held {
                    if !wanted.contains(&held.execution_id) {
                        self.executions.forget(held.execution_id).await;
                    }
                }
                for resume in resume {
                    // The server learned of a start from Hello; only a later one is news.
                    let start_known = self.hello_held.iter().any(|held| {
                        held.execution_id == resume.execution_id && held.started_at.is_some()
                    });
                    self.ship(
                        resume.execution_id,
                        resume.stdout_offset,
                        resume.stderr_offset,
                        start_known,
                    );
                    if resume.cancel {
                        self.executions.cancel(resume.execution_id).await;
                    }
                }
            }
            ServerMessage::Execute(execute) => {
                let execution_id = execute.execution_id;
                match self.executions.accept(*execute).await {
                    Ok(acceptance) => {
                        self.send(AgentMessage::Accepted { execution_id }).await?;
                        let shipping = self
                            .shippers
                            .get(&execution_id)
                            .is_some_and(|shipper| !shipper.0.is_finished());
                        if acceptance == Acceptance::New || !shipping {
                            self.ship(execution_id, 0, 0, false);
                        }
                        if acceptance == Acceptance::AlreadyHeld {
                            tracing::info!(%execution_id, "already accepted this execution; not running it again");
                        }
                    }
                    // Not acknowledged: the server delivers it again on a later connection.
                    Err(error) => {
                        tracing::warn!(%error, %execution_id, "could not accept an execution")
                    }
                }
            }
            ServerMessage::Cancel { execution_id } => self.executions.cancel(execution_id).await,
            ServerMessage::Ack { execution_id } => {
                self.shippers.remove(&execution_id);
                self.executions.acknowledge(execution_id).await;
            }
            ServerMessage::Ping { nonce } => self.send(AgentMessage::Pong { nonce }).await?,
        }
        Ok(())
    }

    /// Starts shipping an execution's output from the given offsets; replaces any shipper it
    /// had on this connection.
    fn ship(
        &mut self,
        execution_id: Uuid,
        stdout_offset: u64,
        stderr_offset: u64,
        start_known: bool,
    ) {
        let Some((progress, paths)) = self.executions.subscribe(execution_id) else {
            tracing::warn!(%execution_id, "the server asked about an execution this agent does not hold");
            return;
        };
        let shipper = Shipper {
            execution_id,
            paths,
            stdout_offset,
            stderr_offset,
            start_sent: start_known,
            outbox: self.outbox.clone(),
        };
        let task = tokio::spawn(async move {
            if let Err(error) = shipper.run(progress).await {
                tracing::debug!(error = %format!("{error:#}"), %execution_id, "stopped shipping output");
            }
        });
        self.shippers.insert(execution_id, AbortOnDrop(task));
    }
}

/// Sends one execution's output, in order and from where the server's copy ends, then its
/// result.
struct Shipper {
    execution_id: Uuid,
    paths: OutputPaths,
    stdout_offset: u64,
    stderr_offset: u64,
    start_sent: bool,
    outbox: mpsc::Sender<AgentMessage>,
}

impl Shipper {
    async fn run(mut self, mut progress: watch::Receiver<Progress>) -> anyhow::Result<()> {
        let mut buffer = vec![0_u8; MAX_OUTPUT_CHUNK];
        loop {
            let snapshot = progress.borrow_and_update().clone();
            if let (false, Some(started)) = (self.start_sent, snapshot.started) {
                self.send(AgentMessage::Started {
                    execution_id: self.execution_id,
                    pid: started.pid,
                    at: started.at,
                })
                .await?;
                self.start_sent = true;
            }
            self.stdout_offset = self
                .send_stream(
                    Stream::Stdout,
                    self.stdout_offset,
                    snapshot.stdout_len,
                    &mut buffer,
                )
                .await?;
            self.stderr_offset = self
                .send_stream(
                    Stream::Stderr,
                    self.stderr_offset,
                    snapshot.stderr_len,
                    &mut buffer,
                )
                .await?;
            if let Some(finished) = snapshot.finished
                && self.stdout_offset >= finished.stdout_bytes
                && self.stderr_offset >= finished.stderr_bytes
            {
                return self.send(AgentMessage::Finished(finished)).await;
            }
            // Woken by the executor's next append or by the end; an error means the execution
            // was forgotten, and there is nothing left to send.
            if progress.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    async fn send(&self, message: AgentMessage) -> anyhow::Result<()> {
        self.outbox
            .send(message)
            .await
            .map_err(|_| anyhow!("the connection closed"))
    }

    /// Sends `[offset, end)` of one stream in chunks; returns the new offset.
    async fn send_stream(
        &self,
        stream: Stream,
        mut offset: u64,
        end: u64,
        buffer: &mut [u8],
    ) -> anyhow::Result<u64> {
        if offset >= end {
            return Ok(offset);
        }
        let path = match stream {
            Stream::Stdout => &self.paths.stdout,
            Stream::Stderr => &self.paths.stderr,
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        file.seek(SeekFrom::Start(offset))
            .await
            .with_context(|| format!("seeking in {}", path.display()))?;
        while offset < end {
            let wanted = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let count = file
                .read(&mut buffer[..wanted])
                .await
                .with_context(|| format!("reading {}", path.display()))?;
            if count == 0 {
                // The file is shorter than recorded, which only a damaged journal does: the
                // result still goes out rather than waiting forever for bytes that are gone.
                tracing::warn!(execution_id = %self.execution_id, stream = stream.as_str(), offset, end, "output file is shorter than recorded");
                return Ok(end);
            }
            self.send(AgentMessage::Output {
                execution_id: self.execution_id,
                stream,
                offset,
                data: buffer[..count].to_vec(),
            })
            .await?;
            offset += count as u64;
        }
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(backoff.ceiling().as_millis());
            let delay = backoff.next_delay();
            assert!(delay <= Backoff::LAST_CEILING);
        }
        assert_eq!(
            ceilings,
            vec![
                200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000, 10_000, 10_000
            ]
        );
        backoff.reset();
        assert_eq!(backoff.ceiling(), Backoff::FIRST_CEILING);
        assert!(backoff.next_delay() <= Backoff::FIRST_CEILING);
    }

    #[test]
    fn backoff_is_jittered() {
        let delays: HashSet<Duration> = (0..20)
            .map(|_| {
                let mut backoff = Backoff { attempt: 6 };
                backoff.next_delay()
            })
            .collect();
        assert!(
            delays.len() > 1,
            "twenty draws from 0..=10s should not all be equal"
        );
    }

    #[test]
    fn connect_urls() {
        let check = |server: &str, expected: Option<&str>| {
            assert_eq!(connect_url(server).ok().as_deref(), expected, "{server}");
        };
        check(
            "http://127.0.0.1:7070",
            Some("ws://127.0.0.1:7070/v1/agents/connect"),
        );
        check(
            "https://fleet.example/",
            Some("wss://fleet.example/v1/agents/connect"),
        );
        check(
            "https://fleet.example/base",
            Some("wss://fleet.example/base/v1/agents/connect"),
        );
        check("ftp://fleet.example", None);
    }

    #[test]
    fn credentials_are_private_and_round_trip() {
        let state = tempfile::tempdir().expect("tempdir");
        let credential = Credential {
            server_url: "http://127.0.0.1:7070".to_string(),
            machine_id: Uuid::now_v7().to_string(),
            machine_token: "secret".to_string(),
        };
        assert_eq!(load_credential(state.path()).expect("loads"), None);
        save_credential(state.path(), &credential).expect("saved");
        let mode = fs::metadata(credential_path(state.path()))
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_credential(state.path()).expect("loads"),
            Some(credential)
        );
        fs::write(credential_path(state.path()), b"{").expect("corrupted");
        let error = load_credential(state.path()).expect_err("corrupt credential");
        assert!(format!("{error:#}").contains("enroll again"), "{error:#}");
    }
}
