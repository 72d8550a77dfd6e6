//! The gateway: one WebSocket per connected agent. It keeps the registry of who is online,
//! reconciles what the agent holds with what the store expects when an agent (re)connects, and
//! records what the agent reports, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use domain::{ExecutionId, ExecutionState, Limits, MachineId};
use futures_util::{SinkExt, StreamExt};
use proto::agent::{
    self, AgentMessage, Finished, HeldPhase, Hello, Outcome, Resume, ServerMessage, Stream,
};
use store::{Change, ExecutionRecord, ExecutionUpdate, Finish};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::dispatch::execute_message;
use crate::events::Event;
use crate::{AppState, now_millis};

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// An agent that says nothing for this long is gone, whatever TCP thinks.
const SILENCE_LIMIT: Duration = Duration::from_secs(90);
/// Messages queued for one agent before senders wait.
const OUTBOX: usize = 256;

/// A way to reach one connected agent.
#[derive(Clone)]
struct Link {
    connection: u64,
    outbox: Outbox,
    close: Arc<Notify>,
}

/// What the server sends one agent connection, and the executions it sent there: an `Accepted`
/// for one of those is proof enough that the execution is this machine's, with no read of the
/// store on the fan-out's hot path.
#[derive(Clone)]
pub(crate) struct Outbox {
    pub(crate) sender: mpsc::Sender<ServerMessage>,
    sent: Arc<Mutex<std::collections::HashSet<ExecutionId>>>,
}

impl Outbox {
    fn new(sender: mpsc::Sender<ServerMessage>) -> Self {
        Self {
            sender,
            sent: Arc::default(),
        }
    }

    /// Queues an `Execute` for `execution`, remembering that it went to this connection.
    pub(crate) fn execute(&self, execution: ExecutionId, message: ServerMessage) {
        self.sent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(execution);
        push(&self.sender, message);
    }

    /// Whether `execution` was sent on this connection (forgetting it).
    fn take_sent(&self, execution: ExecutionId) -> bool {
        self.sent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&execution)
    }
}

/// Who is connected, by machine.
#[derive(Default)]
pub(crate) struct Gateway {
    links: Mutex<HashMap<MachineId, Link>>,
    next_connection: AtomicU64,
    /// One session at a time per machine: a reconnecting agent's new session waits until the
    /// old one has stopped, so that two sessions never write the same execution's output.
    sessions: Mutex<HashMap<MachineId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Queues `message` for an agent without ever waiting: if its queue is full, a task waits
/// instead, so that one slow agent holds up neither the caller nor the rest of the fleet.
pub(crate) fn push(sender: &mpsc::Sender<ServerMessage>, message: ServerMessage) {
    match sender.try_send(message) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(message)) => {
            let sender = sender.clone();
            tokio::spawn(async move {
                // Closed means the agent went away; it gets its work again on reconnect.
                let _ = sender.send(message).await;
            });
        }
    }
}

impl Gateway {
    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<MachineId, Link>> {
        // A panic while holding this lock cannot leave the map half-changed (each operation is
        // one insert or remove), so a poisoned lock is still good to use.
        self.links
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the machine's current session, if any, to stop, and waits until it has.
    async fn take_over(&self, machine: MachineId) -> tokio::sync::OwnedMutexGuard<()> {
        if let Some(link) = self.links().get(&machine) {
            link.close.notify_one();
        }
        let lock = {
            let mut sessions = self
                .sessions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            sessions.entry(machine).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn register(&self, machine: MachineId, outbox: Outbox, close: Arc<Notify>) -> u64 {
        let connection = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let link = Link {
            connection,
            outbox,
            close,
        };
        if let Some(old) = self.links().insert(machine, link) {
            // The machine reconnected before its old connection was noticed dead.
            old.close.notify_one();
        }
        connection
    }

    fn unregister(&self, machine: MachineId, connection: u64) {
        let mut links = self.links();
        if links
            .get(&machine)
            .is_some_and(|link| link.connection == connection)
        {
            links.remove(&machine);
        }
    }

    pub(crate) fn link(&self, machine: MachineId) -> Option<Outbox> {
        self.links().get(&machine).map(|link| link.outbox.clone())
    }

    pub(crate) fn is_online(&self, machine: MachineId) -> bool {
        self.links().contains_key(&machine)
    }

    pub(crate) fn disconnect(&self, machine: MachineId) {
        if let Some(link) = self.links().remove(&machine) {
            link.close.notify_one();
        }
    }

    pub(crate) fn disconnect_all(&self) {
        for (_, link) in self.links().drain() {
            link.close.notify_one();
        }
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Write(#[from] crate::writer::WriteFailed),
}

/// Serves one agent connection until it closes.
pub(crate) async fn session(state: AppState, machine_id: MachineId, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (sender, mut outbox) = mpsc::channel::<ServerMessage>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            let frame = Message::Binary(agent::encode(&message).into());
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Binary(bytes)))) => match agent::decode::<AgentMessage>(&bytes) {
            Ok(AgentMessage::Hello(hello)) => Some(hello),
            Ok(other) => {
                tracing::warn!(machine = %machine_id, "agent sent {other:?} before Hello");
                None
            }
            Err(error) => {
                tracing::warn!(machine = %machine_id, %error, "agent's first frame");
                None
            }
        },
        _ => None,
    };
    let Some(hello) = hello else {
        drop(sender);
        let _ = writer.await;
        return;
    };
    if hello.protocol != agent::PROTOCOL_VERSION {
        tracing::warn!(machine = %machine_id, protocol = hello.protocol, "agent speaks another protocol version");
        drop(sender);
        let _ = writer.await;
        return;
    }

    let _session = state.gateway.take_over(machine_id).await;
    let close = Arc::new(Notify::new());
    let outbox = Outbox::new(sender.clone());
    let connection = state
        .gateway
        .register(machine_id, outbox.clone(), close.clone());
    tracing::info!(machine = %machine_id, hostname = %hello.hostname, "agent connected");
    let mut conversation = Conversation {
        state: state.clone(),
        machine_id,
        sender,
        outbox,
        known: HashMap::new(),
    };
    let result = conversation.run(hello, &mut stream, &close).await;
    match &result {
        Ok(()) => tracing::info!(machine = %machine_id, "agent disconnected"),
        Err(error) => tracing::warn!(machine = %machine_id, %error, "agent connection closed"),
    }
    state.gateway.unregister(machine_id, connection);
    // Output held for executions that did not end here is resent by the agent when it comes
    // back; the copies here would only be stale.
    {
        let mut held = state.small_output();
        for id in conversation.known.keys() {
            held.remove(id);
        }
    }
    if let Err(error) = state.store.set_last_seen(machine_id, now_millis()).await {
        tracing::warn!(machine = %machine_id, %error, "recording when the machine was last seen");
    }
    drop(conversation);
    let _ = writer.await;
}

/// What this connection knows of an execution it touched.
struct Known {
    /// Bytes received so far, per stream (stdout, stderr).
    received: [u64; 2],
    /// What is stored, when this connection saw all of it (from byte 0): then the end of an
    /// execution needs no file reads.
    stored: Option<StoredOutput>,
    /// Per stream: whether it is in a blob file. Until then (and only while `stored` is
    /// exact) it is held in memory, in `small_output`.
    spilled: [bool; 2],
}

impl Known {
    fn fresh() -> Self {
        Known {
            received: [0, 0],
            stored: Some(StoredOutput::default()),
            spilled: [false, false],
        }
    }

    fn resumed(received: [u64; 2]) -> Self {
        let stored = (received == [0, 0]).then(StoredOutput::default);
        Known {
            received,
            stored,
            spilled: [received[0] > 0, received[1] > 0],
        }
    }
}

/// The length and the last `Limits::TAIL_BYTES` of each stream of an execution, as stored.
#[derive(Default, Clone)]
struct StoredOutput {
    len: [u64; 2],
    tail: [Vec<u8>; 2],
}

impl StoredOutput {
    fn append(&mut self, index: usize, data: &[u8]) {
        self.len[index] += data.len() as u64;
        let tail = &mut self.tail[index];
        tail.extend_from_slice(&data[data.len().saturating_sub(Limits::TAIL_BYTES)..]);
        let excess = tail.len().saturating_sub(Limits::TAIL_BYTES);
        tail.drain(..excess);
    }
}

struct Conversation {
    state: AppState,
    machine_id: MachineId,
    sender: mpsc::Sender<ServerMessage>,
    outbox: Outbox,
    known: HashMap<ExecutionId, Known>,
}

impl Conversation {
    async fn run(
        &mut self,
        hello: Hello,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        close: &Notify,
    ) -> Result<(), SessionError> {
        self.welcome(hello).await?;
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                // A newer session of this machine is waiting: stop before reading anything more.
                biased;
                _ = close.notified() => return Ok(()),
                frame = stream.next() => {
                    let bytes = match frame {
                        Some(Ok(Message::Binary(bytes))) => bytes,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            last_heard = Instant::now();
                            continue;
                        }
                        Some(Ok(Message::Text(_))) => {
                            return Err(SessionError::Protocol("agent sent a text frame".into()));
                        }
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Err(error)) => return Err(SessionError::Protocol(format!("reading: {error}"))),
                    };
                    last_heard = Instant::now();
                    let message = agent::decode::<AgentMessage>(&bytes)
                        .map_err(|error| SessionError::Protocol(error.to_string()))?;
                    self.handle(message).await?;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        return Err(SessionError::Protocol("agent silent for too long".into()));
                    }
                    nonce += 1;
                                        self.send(ServerMessage::Ping { nonce }).await;
                }
            }
        }
    }

    /// Never waits: the read loop must keep reading, or an agent that is itself waiting to
    /// send could wedge both directions.
    async fn send(&self, message: ServerMessage) {
        push(&self.sender, message);
    }

    /// Records the machine's facts, settles what the agent holds against what the store
    /// expects, and sends the agent what it should run.
    async fn welcome(&mut self, hello: Hello) -> Result<(), SessionError> {
        let store = &self.state.store;
        if let Some(mut machine) = store.get_machine(self.machine_id).await? {
            if domain::check_labels(&hello.labels).is_ok() {
                machine.labels = hello.labels.clone();
            } else {
                tracing::warn!(machine = %self.machine_id, "agent reported invalid labels; keeping the old ones");
            }
            machine.hostname = hello.hostname.clone();
            machine.os = hello.os.clone();
            machine.arch = hello.arch.clone();
            machine.agent_version = hello.agent_version.clone();
            machine.interpreters = hello.interpreters.clone();
            machine.last_seen_at = Some(now_millis());
            store.update_machine_facts(&machine).await?;
        }

        let held: HashMap<ExecutionId, _> = hello
            .held
            .iter()
            .map(|held| (ExecutionId::from(held.execution_id), held))
            .collect();
        let now = now_millis();
        let mut updates = Vec::new();
        let mut resume = Vec::new();
        let mut to_send = Vec::new();
        for execution in store.open_executions(self.machine_id).await? {
            match held.get(&execution.id) {
                Some(held) => {
                    let change = match held.phase {
                        HeldPhase::Queued => Change::Delivered { at: now },
                        HeldPhase::Running | HeldPhase::Finished => Change::Started {
                            at: held.started_at.unwrap_or(now),
                        },
                    };
                    updates.push(self.update(execution.id, change));
                    let stdout = self.state.blobs.len(execution.id, "stdout").await?;
                    let stderr = self.state.blobs.len(execution.id, "stderr").await?;
                    self.known
                        .insert(execution.id, Known::resumed([stdout, stderr]));
                    resume.push(Resume {
                        execution_id: execution.id.as_uuid(),
                        stdout_offset: stdout,
                        stderr_offset: stderr,
                        cancel: execution.cancel_requested,
                    });
                }
                None if execution.state == ExecutionState::Pending => to_send.push(execution),
                None => updates.push(self.lost(&execution, now).await?),
            }
        }
        let changed: std::collections::HashSet<ExecutionId> = self
            .state
            .writer
            .apply(updates)
            .await?
            .iter()
            .map(|execution| execution.id)
            .collect();
        // A held execution may have ended on the server while this was being worked out (its
        // delivery deadline passed, the run was canceled): then the agent must drop it, which
        // leaving it out of `resume` tells it.
        let mut still_open = Vec::with_capacity(resume.len());
        for entry in resume {
            let id = ExecutionId::from(entry.execution_id);
            let open = changed.contains(&id)
                || store
                    .get_execution(id)
                    .await?
                    .is_some_and(|execution| !execution.state.is_terminal());
            if open {
                still_open.push(entry);
            } else {
                self.known.remove(&id);
            }
        }
        let resume = still_open;
        self.send(ServerMessage::Welcome {
            machine_id: self.machine_id.as_uuid(),
            resume,
        })
        .await;

        let mut runs = HashMap::new();
        let mut backlog = Vec::new();
        for execution in to_send {
            let run = match runs.entry(execution.run_id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let Some(run) = store.get_run_spec(execution.run_id).await? else {
                        continue;
                    };
                    entry.insert(run)
                }
            };
            if let Some(message) = execute_message(&self.state, run, execution.id) {
                backlog.push((execution.id, message));
            }
        }
        // A machine back after a long absence may have more work waiting than its queue
        // holds: a task feeds it in order, so the read loop starts at once.
        if !backlog.is_empty() {
            let outbox = self.outbox.clone();
            tokio::spawn(async move {
                for (execution, message) in backlog {
                    outbox
                        .sent
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(execution);
                    if outbox.sender.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(())
    }

    /// The agent does not hold an execution it was given: its outcome is unknown.
    async fn lost(
        &self,
        execution: &ExecutionRecord,
        now: i64,
    ) -> Result<ExecutionUpdate, SessionError> {
        let stored = self.stored_output(execution.id).await?;
        let finish = self.finish_record(
            ExecutionState::Interrupted,
            None,
            Some(
                "the agent no longer holds this execution (its state directory may have been \
                     lost); the outcome is unknown"
                    .to_string(),
            ),
            execution.started_at,
            now,
            [0, 0],
            stored,
            Some("Interrupted".to_string()),
        );
        Ok(self.update(execution.id, Change::Finished(Box::new(finish))))
    }

    /// A change reported by this agent, scoped to its machine.
    fn update(&self, id: ExecutionId, change: Change) -> ExecutionUpdate {
        ExecutionUpdate {
            id,
            machine: Some(self.machine_id),
            change,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_record(
        &self,
        state: ExecutionState,
        exit_code: Option<i32>,
        message: Option<String>,
        started_at: Option<i64>,
        finished_at: i64,
        dropped: [u64; 2],
        stored: StoredOutput,
        error_code: Option<String>,
    ) -> Finish {
        let StoredOutput {
            len,
            tail: [stdout_tail, stderr_tail],
        } = stored;
        Finish {
            state,
            exit_code,
            message,
            started_at,
            finished_at,
            stdout_bytes: len[0],
            stderr_bytes: len[1],
            stdout_dropped: dropped[0],
            stderr_dropped: dropped[1],
            stdout_tail,
            stderr_tail,
            error_code,
        }
    }

    /// What is stored of an execution's output: from memory when this connection saw it all,
    /// else from the blob files.
    async fn stored_output(&self, id: ExecutionId) -> Result<StoredOutput, SessionError> {
        if let Some(stored) = self.known.get(&id).and_then(|known| known.stored.clone()) {
            return Ok(stored);
        }
        let blobs = &self.state.blobs;
        Ok(StoredOutput {
            len: [
                blobs.len(id, "stdout").await?,
                blobs.len(id, "stderr").await?,
            ],
            tail: [
                blobs.tail(id, "stdout", Limits::TAIL_BYTES).await?,
                blobs.tail(id, "stderr", Limits::TAIL_BYTES).await?,
            ],
        })
    }

    /// Looks up an execution this agent names, checking that it is this machine's.
    async fn known(&mut self, id: ExecutionId) -> Result<Option<&mut Known>, SessionError> {
        if !self.known.contains_key(&id) {
            let Some(execution) = self.state.store.get_execution(id).await? else {
                tracing::warn!(machine = %self.machine_id, execution = %id, "agent named an unknown execution");
                return Ok(None);
            };
            if execution.state.is_terminal() {
                tracing::warn!(machine = %self.machine_id, execution = %id, "agent sent output of an execution that is over");
                return Ok(None);
            }
            if execution.machine_id != self.machine_id {
                tracing::warn!(machine = %self.machine_id, execution = %id, "agent named another machine's execution");
                return Ok(None);
            }
            let stdout = self.state.blobs.len(id, "stdout").await?;
            let stderr = self.state.blobs.len(id, "stderr").await?;
            self.known.insert(id, Known::resumed([stdout, stderr]));
        }
        Ok(self.known.get_mut(&id))
    }

    async fn handle(&mut self, message: AgentMessage) -> Result<(), SessionError> {
        match message {
            AgentMessage::Hello(_) => return Err(SessionError::Protocol("a second Hello".into())),
            AgentMessage::Pong { .. } => {}
            AgentMessage::Accepted { execution_id } => {
                let id = ExecutionId::from(execution_id);
                let delivered = self.update(id, Change::Delivered { at: now_millis() });
                if self.outbox.take_sent(id) {
                    // Sent on this connection, so it is this machine's and has no output yet:
                    // carry on at once, and settle the rare race (the execution ended while the
                    // Execute was on its way) when the write is done.
                    self.known.entry(id).or_insert_with(Known::fresh);
                    let written = self.state.writer.submit(vec![delivered]).await?;
                    let (store, sender) = (self.state.store.clone(), self.sender.clone());
                    tokio::spawn(async move {
                        let Ok(Some(changed)) = written.await else {
                            return;
                        };
                        if changed.is_empty()
                            && let Ok(Some(execution)) = store.get_execution(id).await
                            && execution.state.is_terminal()
                        {
                            push(&sender, ServerMessage::Cancel { execution_id });
                        }
                    });
                    return Ok(());
                }
                let changed = self.state.writer.apply(vec![delivered]).await?;
                if changed.is_empty() {
                    // A repeat, another machine's execution, or one that ended (delivery
                    // timeout, canceled run) while the Execute was on its way: then the agent
                    // must not run it.
                    if let Some(execution) = self.state.store.get_execution(id).await?
                        && execution.machine_id == self.machine_id
                        && execution.state.is_terminal()
                    {
                        self.send(ServerMessage::Cancel { execution_id }).await;
                    }
                } else {
                    // The scoped update proved the execution is this machine's, and a freshly
                    // delivered execution has no output yet.
                    self.known.entry(id).or_insert_with(Known::fresh);
                }
            }
            AgentMessage::Started {
                execution_id, at, ..
            } => {
                let id = ExecutionId::from(execution_id);
                // Not awaited: the writer applies requests in order, so the Finished that
                // follows cannot overtake it.
                let at = agent_time(at);
                self.state
                    .writer
                    .submit(vec![self.update(id, Change::Started { at })])
                    .await?;
            }
            AgentMessage::Output {
                execution_id,
                stream,
                offset,
                data,
            } => {
                self.output(ExecutionId::from(execution_id), stream, offset, &data)
                    .await?
            }
            AgentMessage::Finished(finished) => self.finished(finished).await?,
        }
        Ok(())
    }

    async fn output(
        &mut self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SessionError> {
        let cap = self.state.limits.output_cap_bytes;
        let machine_id = self.machine_id;
        let state = self.state.clone();
        let Some(known) = self.known(id).await? else {
            return Ok(());
        };
        let index = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        };
        let received = known.received[index];
        if offset > received {
            // Bytes went missing in between; reconnecting makes the agent resend from what
            // is stored.
            return Err(SessionError::Protocol(format!(
                "output of {id} {} jumps from byte {received} to {offset}",
                stream.as_str()
            )));
        }
        let skip = (received - offset) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        let fresh = &data[skip..];
        known.received[index] = received + fresh.len() as u64;
        let room = cap.saturating_sub(received) as usize;
        let kept = &fresh[..fresh.len().min(room)];
        if !kept.is_empty() {
            let fits = |stored: &StoredOutput| {
                stored.len[index] + kept.len() as u64 <= Limits::TAIL_BYTES as u64
            };
            match &mut known.stored {
                // Small so far: held in memory. If the server stops now, nothing is lost: the
                // file is still empty, so the agent resends from byte 0.
                Some(stored) if !known.spilled[index] && fits(stored) => {
                    stored.append(index, kept);
                    let held = stored.tail[index].clone();
                    state.small_output().entry(id).or_default()[index] = held;
                }
                _ => {
                    if !known.spilled[index] {
                        known.spilled[index] = true;
                        // While it fit, the tail was all of it: it goes to the file first.
                        if let Some(stored) = &known.stored
                            && stored.len[index] > 0
                        {
                            state
                                .blobs
                                .append(id, stream.as_str(), &stored.tail[index])
                                .await?;
                        }
                        if let Some(held) = state.small_output().get_mut(&id) {
                            held[index] = Vec::new();
                        }
                    }
                    state.blobs.append(id, stream.as_str(), kept).await?;
                    if let Some(stored) = &mut known.stored {
                        stored.append(index, kept);
                    }
                }
            }
            state.events.publish(Event::Output { execution_id: id });
        } else {
            tracing::debug!(machine = %machine_id, execution = %id, "output past the cap dropped");
        }
        Ok(())
    }

    async fn finished(&mut self, finished: Finished) -> Result<(), SessionError> {
        let execution_id = finished.execution_id;
        let id = ExecutionId::from(execution_id);
        {
            let state = match finished.outcome {
                Outcome::Succeeded => ExecutionState::Succeeded,
                Outcome::Failed => ExecutionState::Failed,
                Outcome::TimedOut => ExecutionState::TimedOut,
                Outcome::Canceled => ExecutionState::Canceled,
                Outcome::Interrupted => ExecutionState::Interrupted,
            };
            let output = self.stored_output(id).await?;
            let stored = output.len;
            // Whatever the agent kept but the server does not have counts as dropped: the
            // record says exactly what is stored.
            let dropped = [
                finished.stdout_dropped + finished.stdout_bytes.saturating_sub(stored[0]),
                finished.stderr_dropped + finished.stderr_bytes.saturating_sub(stored[1]),
            ];
            let finish = self.finish_record(
                state,
                finished.exit_code,
                finished.message,
                finished.started_at.map(agent_time),
                agent_time(finished.finished_at),
                dropped,
                output,
                finished.error_code,
            );
            // Scoped to this machine: another machine's execution is left alone.
            let update = self.update(id, Change::Finished(Box::new(finish)));
            self.state.writer.apply(vec![update]).await?;
            // Stored in the row now (or it was another machine's): no longer held in memory.
            if self.known.remove(&id).is_some() {
                self.state.small_output().remove(&id);
            }
        }
        // Acknowledge even what was not ours or already over, so the agent can let it go.
        self.send(ServerMessage::Ack { execution_id }).await;
        Ok(())
    }
}

/// A time an agent reported, kept within sense: its clock may be wrong, and a time past the
/// year 9999 could not even be shown.
fn agent_time(at: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    at.clamp(0, now_millis() + DAY)
}
