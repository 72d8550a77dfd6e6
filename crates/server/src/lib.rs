//! The fleetrun server: the REST API for operators, the gateway that holds one WebSocket per
//! agent, and the dispatcher between them. `app(state)` is the whole HTTP surface;
//! `Server::start` binds it and starts the background work.

mod api;
mod auth;
mod dispatch;
mod error;
mod events;
mod gateway;
mod writer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::serve::ListenerExt;
use domain::{ExecutionId, Limits, UnixMillis};
use store::{LocalBlobs, SqliteStore, Store, TokenKind};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use api::{app, openapi};

/// Everything the request handlers and background tasks share.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    store: Arc<dyn Store>,
    blobs: LocalBlobs,
    limits: Limits,
    gateway: gateway::Gateway,
    events: events::Events,
    writer: writer::Writer,
    /// Output that fits an execution's inline tail is held here until the execution ends (then
    /// it is in its row) or outgrows the tail (then it goes to a blob file): most executions
    /// print little, and a file each was the largest cost of a large fan-out.
    small_output: Mutex<HashMap<ExecutionId, [Vec<u8>; 2]>>,
    /// Woken when a new delivery deadline may be earlier than the one being waited for.
    deadlines_changed: Notify,
    /// Held while a named run command is replaced or deleted.
    run_commands: tokio::sync::Mutex<()>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Shared state, and the group-commit writer task behind it. Must be called within a
    /// tokio runtime.
    pub fn new(store: Arc<dyn Store>, blobs: LocalBlobs, limits: Limits) -> Self {
        let (writer, receiver) = writer::Writer::new();
        let state = Self(Arc::new(Shared {
            store,
            blobs,
            limits,
            gateway: gateway::Gateway::default(),
            events: events::Events::new(),
            writer,
            small_output: Mutex::default(),
            deadlines_changed: Notify::new(),
            run_commands: tokio::sync::Mutex::new(()),
        }));
        writer::Writer::start(&state, receiver);
        state
    }
}

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub limits: Limits,
}

/// A server that is listening.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    listener: TcpListener,
}

impl Server {
    /// Opens the data directory (creating it on first use) and binds the listener.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let store = SqliteStore::open(&config.data_dir.join("fleetrun.db"))
            .await
            .context("opening the database")?;
        let blobs =
            LocalBlobs::new(config.data_dir.join("blobs")).context("opening the blob directory")?;
        let state = AppState::new(Arc::new(store), blobs, config.limits);
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let addr = listener
            .local_addr()
            .context("reading the listening address")?;
        Ok(Self {
            addr,
            state,
            listener,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        dispatch::resume_held_back(&self.state).await;
        let deadlines = tokio::spawn(dispatch::expire_deliveries(self.state.clone()));
        // Small writes (a streamed output chunk, the end of a response, an agent frame) must
        // leave at once: with Nagle's algorithm each can wait ~40 ms for a delayed ACK.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "setting TCP_NODELAY");
            }
        });
        let result = axum::serve(listener, app(self.state.clone()))
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving HTTP");
        deadlines.abort();
        self.state.gateway.disconnect_all();
        result
    }
}

/// The operator's and the enroller's tokens, kept in a file of `KEY=value` lines in the data
/// directory (mode 0600) so that the same tokens work across restarts. The database keeps only
/// their hashes; if the file is lost, new tokens are made.
pub struct Credentials {
    pub admin_token: String,
    pub enroll_token: String,
}

impl Credentials {
    /// Reads the tokens from `path` if they are still valid, else makes new ones.
    pub async fn load_or_create(state: &AppState, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let value = |key: &str| {
            text.lines()
                .filter_map(|line| line.strip_prefix("export ").unwrap_or(line).split_once('='))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim().to_string())
        };
        let admin_token = ensure_token(state, value("FLEETRUN_TOKEN"), TokenKind::Admin).await?;
        let enroll_token =
            ensure_token(state, value("FLEETRUN_ENROLL_TOKEN"), TokenKind::Enroll).await?;
        Ok(Self {
            admin_token,
            enroll_token,
        })
    }

    /// Writes `FLEETRUN_URL`, `FLEETRUN_TOKEN` and `FLEETRUN_ENROLL_TOKEN` lines to `path`.
    pub fn write(&self, path: &Path, url: &str) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = self.env_lines(url, "");
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    pub fn env_lines(&self, url: &str, prefix: &str) -> String {
        format!(
            "{prefix}FLEETRUN_URL={url}\n{prefix}FLEETRUN_TOKEN={}\n{prefix}FLEETRUN_ENROLL_TOKEN={}\n",
            self.admin_token, self.enroll_token
        )
    }
}

async fn ensure_token(
    state: &AppState,
    known: Option<String>,
    kind: TokenKind,
) -> anyhow::Result<String> {
    if let Some(token) = known {
        let record = state.store.find_token(&auth::hash_token(&token)).await?;
        if record.is_some_and(|record| record.kind == kind) {
            return Ok(token);
        }
    }
    let token = auth::new_token(kind);
    state
        .store
        .insert_token(&auth::hash_token(&token), kind, None, now_millis())
        .await?;
    Ok(token)
}

pub(crate) fn now_millis() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as UnixMillis)
        .unwrap_or_default()
}

impl Shared {
    fn small_output(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutionId, [Vec<u8>; 2]>> {
        // Each operation replaces or removes one entry whole, so a poisoned lock is still sound.
        self.small_output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to `max` bytes of stream `index` of `execution` from `offset`, wherever they are: in
    /// the blob file, held in memory, or (for an execution that ended with little output) in
    /// its row's tail.
    pub(crate) async fn read_output(
        &self,
        execution: ExecutionId,
        index: usize,
        offset: u64,
        max: usize,
    ) -> std::io::Result<Vec<u8>> {
        let stream = ["stdout", "stderr"][index];
        if self.blobs.len(execution, stream).await? > 0 {
            return self.blobs.read(execution, stream, offset, max).await;
        }
        let held = self
            .small_output()
            .get(&execution)
            .map(|streams| slice(&streams[index], offset, max));
        if let Some(bytes) = held {
            return Ok(bytes);
        }
        let row = self
            .store
            .get_execution(execution)
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        Ok(match row {
            Some(row) => {
                let (len, tail) = if index == 0 {
                    (row.stdout_bytes, row.stdout_tail)
                } else {
                    (row.stderr_bytes, row.stderr_tail)
                };
                // The tail is the whole output only when the output fit it.
                if len == tail.len() as u64 {
                    slice(&tail, offset, max)
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        })
    }
}

fn slice(bytes: &[u8], offset: u64, max: usize) -> Vec<u8> {
    let start = (offset as usize).min(bytes.len());
    bytes[start..bytes.len().min(start.saturating_add(max))].to_vec()
}
