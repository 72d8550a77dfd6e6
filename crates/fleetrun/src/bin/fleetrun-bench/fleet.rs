//! Simulated agents: one lightweight task per agent in this process, each a real WebSocket
//! speaking the real agent protocol, "executing" every `Execute` at once with three bytes of
//! output. A shared `Probe` records when deliveries and acknowledgements arrive.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use proto::agent::{AgentMessage, Execute, Finished, Hello, Outcome, ServerMessage, Stream};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Connections being set up at once. The server's accept backlog and its per-connection
/// work (a store read and write on `Hello`) are the limit; more in flight only adds retries.
const CONNECTING_AT_ONCE: usize = 256;
/// One attempt to connect, upgrade, say `Hello` and hear `Welcome`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_ATTEMPTS: u32 = 5;
/// Connections per source address: far below the 28,000 ephemeral ports of one address.
const AGENTS_PER_ADDRESS: usize = 1000;
/// Small WebSocket buffers, as the real agent uses: 100,000 connections must fit in memory.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024;
/// The output every simulated execution "prints".
const OUTPUT: &[u8] = b"hi\n";

type Socket = WebSocketStream<TcpStream>;

/// Moments of the current trial, in nanoseconds since the probe was made; updated by every
/// agent task without locks.
pub(crate) struct Probe {
    origin: Instant,
    first_execute: AtomicU64,
    last_execute: AtomicU64,
    first_ack: AtomicU64,
    last_ack: AtomicU64,
    executes: AtomicU64,
    acks: AtomicU64,
}

/// What the agents saw of one trial, as offsets from its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProbeReading {
    pub(crate) first_execute: Option<Duration>,
    pub(crate) last_execute: Option<Duration>,
    pub(crate) first_ack: Option<Duration>,
    pub(crate) last_ack: Option<Duration>,
    /// `Execute` messages received: one per agent, or something was sent twice.
    pub(crate) executes: u64,
}

impl Probe {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            first_execute: AtomicU64::new(u64::MAX),
            last_execute: AtomicU64::new(0),
            first_ack: AtomicU64::new(u64::MAX),
            last_ack: AtomicU64::new(0),
            executes: AtomicU64::new(0),
            acks: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Forgets the last trial; answers the start of the next one.
    pub(crate) fn reset(&self) -> Instant {
        for (moment, empty) in [
            (&self.first_execute, u64::MAX),
            (&self.last_execute, 0),
            (&self.first_ack, u64::MAX),
            (&self.last_ack, 0),
            (&self.executes, 0),
            (&self.acks, 0),
        ] {
            moment.store(empty, Ordering::SeqCst);
        }
        Instant::now()
    }

    fn saw_execute(&self) {
        let now = self.now();
        self.first_execute.fetch_min(now, Ordering::Relaxed);
        self.last_execute.fetch_max(now, Ordering::Relaxed);
        self.executes.fetch_add(1, Ordering::Relaxed);
    }

    fn saw_ack(&self) {
        let now = self.now();
        self.first_ack.fetch_min(now, Ordering::Relaxed);
        self.last_ack.fetch_max(now, Ordering::Relaxed);
        self.acks.fetch_add(1, Ordering::Relaxed);
    }

    /// Acknowledgements received since the last reset.
    pub(crate) fn acks(&self) -> u64 {
        self.acks.load(Ordering::SeqCst)
    }

    /// The trial that began at `start`, as seen so far.
    pub(crate) fn read(&self, start: Instant) -> ProbeReading {
        let start = start.duration_since(self.origin).as_nanos() as u64;
        let executes = self.executes.load(Ordering::SeqCst);
        let acks = self.acks();
        let offset = |moment: &AtomicU64, seen: bool| {
            seen.then(|| Duration::from_nanos(moment.load(Ordering::SeqCst).saturating_sub(start)))
        };
        ProbeReading {
            first_execute: offset(&self.first_execute, executes > 0),
            last_execute: offset(&self.last_execute, executes > 0),
            first_ack: offset(&self.first_ack, acks > 0),
            last_ack: offset(&self.last_ack, acks > 0),
            executes,
        }
    }
}

/// How the agents are doing.
#[derive(Default)]
struct Tally {
    connected: AtomicUsize,
    /// Failed to connect, or lost their connection afterwards.
    failed: AtomicUsize,
    first_failure: Mutex<Option<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut first) = self.first_failure.lock() {
            first.get_or_insert(why);
        }
    }

    fn first_failure(&self) -> String {
        self.first_failure
            .lock()
            .ok()
            .and_then(|first| first.clone())
            .unwrap_or_default()
    }
}

/// The simulated agents of one server. Dropping it aborts every task, which closes their
/// connections.
pub(crate) struct Fleet {
    pub(crate) probe: Arc<Probe>,
    tally: Arc<Tally>,
    _tasks: JoinSet<()>,
}

/// Where and how every simulated agent connects.
struct Target {
    server: SocketAddr,
    url: String,
    /// Second octet of the source addresses, so that each server gets fresh addresses and
    /// never meets the previous server's connections in TIME_WAIT.
    network: u8,
}

impl Fleet {
    /// Connects one agent per token to the server at `server` and waits until each has heard
    /// `Welcome`; an error if any cannot connect or it takes longer than `limit`.
    pub(crate) async fn connect(
        server: SocketAddr,
        tokens: Vec<String>,
        network: u8,
        limit: Duration,
    ) -> anyhow::Result<Self> {
        let count = tokens.len();
        let target = Arc::new(Target {
            server,
            url: format!("ws://{server}/v1/agents/connect"),
            network,
        });
        let probe = Arc::new(Probe::new());
        let tally = Arc::new(Tally::default());
        let gate = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
        let mut tasks = JoinSet::new();
        for (index, token) in tokens.into_iter().enumerate() {
            tasks.spawn(simulated_agent(
                index,
                token,
                target.clone(),
                probe.clone(),
                gate.clone(),
                tally.clone(),
            ));
        }
        let fleet = Self {
            probe,
            tally,
            _tasks: tasks,
        };
        fleet.wait_connected(count, limit).await?;
        Ok(fleet)
    }

    async fn wait_connected(&self, count: usize, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.check()?;
            let connected = self.tally.connected.load(Ordering::SeqCst);
            if connected >= count {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("only {connected} of {count} simulated agents connected after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error if any agent failed to connect or lost its connection.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        let failed = self.tally.failed.load(Ordering::SeqCst);
        if failed > 0 {
            bail!(
                "{failed} simulated agents failed or were disconnected; the first: {}",
                self.tally.first_failure()
            );
        }
        Ok(())
    }
}

/// One simulated agent, for as long as its connection lasts.
async fn simulated_agent(
    index: usize,
    token: String,
    target: Arc<Target>,
    probe: Arc<Probe>,
    gate: Arc<Semaphore>,
    tally: Arc<Tally>,
) {
    let socket = {
        // Held until `Welcome`: it bounds connection setups in flight, not connections.
        let Ok(_permit) = gate.acquire().await else {
            return;
        };
        match connect(index, &token, &target).await {
            Ok(socket) => socket,
            Err(error) => {
                tally.fail(format!("agent {index} could not connect: {error:#}"));
                return;
            }
        }
    };
    tally.connected.fetch_add(1, Ordering::SeqCst);
    match serve(socket, &probe).await {
        Ok(()) => tally.fail(format!("the server closed agent {index}'s connection")),
        Err(error) => tally.fail(format!("agent {index}: {error:#}")),
    }
}

/// The source address of agent `index`: 127.<network>.x.y, a thousand agents each.
fn source_address(network: u8, index: usize) -> IpAddr {
    let address = index / AGENTS_PER_ADDRESS;
    // 250 hosts per third octet, from .1: never a network or broadcast-looking address.
    let third = ((address / 250) % 256) as u8;
    let fourth = (address % 250) as u8 + 1;
    IpAddr::V4(Ipv4Addr::new(127, network, third, fourth))
}

/// Connects agent `index`, retrying a few times: under a burst of connections the server
/// may drop some from its accept backlog.
async fn connect(index: usize, token: &str, target: &Target) -> anyhow::Result<Socket> {
    let source = source_address(target.network, index);
    let mut last_error = None;
    for attempt in 1..=CONNECT_ATTEMPTS {
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_once(source, token, target)).await {
            Ok(Ok(socket)) => return Ok(socket),
            Ok(Err(error)) => last_error = Some(error),
            Err(_) => last_error = Some(anyhow::anyhow!("no Welcome within {CONNECT_TIMEOUT:?}")),
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!("{CONNECT_ATTEMPTS} attempts from {source}")))
}

async fn connect_once(source: IpAddr, token: &str, target: &Target) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4().context("creating a socket")?;
    // A port of an earlier run may still be in TIME_WAIT; it does not clash with this server.
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket
        .bind(SocketAddr::new(source, 0))
        .with_context(|| format!("binding to {source}"))?;
    let stream = socket
        .connect(target.server)
        .await
        .with_context(|| format!("connecting to {}", target.server))?;
    // The protocol is small frames; Nagle would hold each for a delayed ACK.
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let mut request = target
        .url
        .as_str()
        .into_client_request()
        .context("building the upgrade request")?;
    let authorization =
        HeaderValue::from_str(&format!("Bearer {token}")).context("a machine token header")?;
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, authorization);
    let config = WebSocketConfig::default()
        .read_buffer_size(SOCKET_BUFFER_BYTES)
        .write_buffer_size(SOCKET_BUFFER_BYTES)
        .max_write_buffer_size(proto::agent::MAX_FRAME_BYTES)
        .max_message_size(Some(proto::agent::MAX_FRAME_BYTES))
        .max_frame_size(Some(proto::agent::MAX_FRAME_BYTES));
    let (mut socket, _response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .context("WebSocket upgrade")?;
    send(&mut socket, &AgentMessage::Hello(hello(source))).await?;
    socket.flush().await.context("sending Hello")?;
    match next_message(&mut socket).await? {
        Some(ServerMessage::Welcome { .. }) => Ok(socket),
        Some(other) => bail!("expected Welcome, got {other:?}"),
        None => bail!("the server closed the connection after Hello"),
    }
}

fn hello(source: IpAddr) -> Hello {
    Hello {
        protocol: proto::agent::PROTOCOL_VERSION,
        agent_version: "fleetrun-bench".to_string(),
        hostname: format!("sim-{source}"),
        os: "linux".to_string(),
        arch: std::env::consts::ARCH.to_string(),
        labels: BTreeMap::new(),
        interpreters: vec!["sh".to_string()],
        max_parallel: 4,
        held: Vec::new(),
    }
}

/// Answers the server until the connection ends.
async fn serve(mut socket: Socket, probe: &Probe) -> anyhow::Result<()> {
    while let Some(message) = next_message(&mut socket).await? {
        match message {
            ServerMessage::Execute(execute) => {
                probe.saw_execute();
                report_success(&mut socket, &execute).await?;
            }
            ServerMessage::Ack { .. } => probe.saw_ack(),
            ServerMessage::Ping { nonce } => {
                send(&mut socket, &AgentMessage::Pong { nonce }).await?;
                socket.flush().await.context("sending Pong")?;
            }
            ServerMessage::Welcome { .. } | ServerMessage::Cancel { .. } => {}
        }
    }
    Ok(())
}

/// The next protocol message, skipping WebSocket control frames; `None` when the server
/// closes the connection.
async fn next_message(socket: &mut Socket) -> anyhow::Result<Option<ServerMessage>> {
    while let Some(frame) = socket.next().await {
        match frame.context("reading from the server")? {
            Message::Binary(bytes) => {
                let message = proto::agent::decode(&bytes).context("decoding a server frame")?;
                return Ok(Some(message));
            }
            Message::Close(_) => return Ok(None),
            // Pings are answered by tungstenite; text is not part of the protocol.
            Message::Text(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
    Ok(None)
}

/// Queues a frame; `flush` sends what is queued in as few writes as possible.
async fn send(socket: &mut Socket, message: &AgentMessage) -> anyhow::Result<()> {
    let frame = Message::Binary(proto::agent::encode(message).into());
    socket.feed(frame).await.context("writing to the server")
}

/// What a real agent says for an execution that printed `hi` and exited 0, in one flush.
async fn report_success(socket: &mut Socket, execute: &Execute) -> anyhow::Result<()> {
    let execution_id = execute.execution_id;
    let now = now_millis();
    let messages = [
        AgentMessage::Accepted { execution_id },
        AgentMessage::Started {
            execution_id,
            pid: 0,
            at: now,
        },
        AgentMessage::Output {
            execution_id,
            stream: Stream::Stdout,
            offset: 0,
            data: OUTPUT.to_vec(),
        },
        AgentMessage::Finished(Finished {
            execution_id,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            message: None,
            started_at: Some(now),
            finished_at: now,
            stdout_bytes: OUTPUT.len() as u64,
            stderr_bytes: 0,
            stdout_dropped: 0,
            stderr_dropped: 0,
            error_code: None,
        }),
    ];
    for message in &messages {
        send(socket, message).await?;
    }
    socket.flush().await.context("sending a result")
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}
