//! The fleetrun agent: keeps one outbound WebSocket to the server, runs the scripts it is sent,
//! and reports their output and results. It never listens on a port.

mod connection;
mod executions;
mod executor;
mod journal;
#[cfg(test)]
mod test_support;
mod transfer;

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::executions::{Executions, Settings};

/// How an agent runs: which server, who it is, where it keeps its state.
#[derive(Clone)]
pub struct AgentConfig {
    /// `http://127.0.0.1:7070` or `https://...`.
    pub server_url: String,
    /// Needed only when no credential is saved yet.
    pub enroll_token: Option<String>,
    /// The machine name to enroll as.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    /// Executions run at once; more wait in order.
    pub max_parallel: usize,
    /// Between SIGTERM and SIGKILL when a script is stopped.
    pub kill_grace: Duration,
}

/// Runs the agent until `shutdown` resolves (Ctrl-C) or a fatal error (bad enroll token,
/// credential rejected). Network errors are never fatal: it reconnects.
pub async fn run(
    mut config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // The state directory holds the credential and scripts: private to the agent's user.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    // Scripts run in their own working directories, so every path handed to them must be
    // absolute.
    config.state_dir = std::fs::canonicalize(&config.state_dir)
        .with_context(|| format!("resolving {}", config.state_dir.display()))?;

    let executions = Executions::open(&Settings {
        state_dir: config.state_dir.clone(),
        max_parallel: config.max_parallel,
        kill_grace: config.kill_grace,
    })
    .await?;
    let served = connection::serve(&config, &executions, shutdown).await;
    // Running scripts are stopped either way: nothing runs unsupervised after the agent.
    executions.shutdown().await;
    tracing::info!("agent stopped");
    served
}
