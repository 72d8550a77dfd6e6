//! A real `fleetrun server` process in a scratch directory, and what the benchmark asks of it
//! over REST: enrollment, who is online.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use proto::api::{EnrollRequest, EnrollResponse};

use crate::procs::Daemon;

/// Longest the server may take to write `server.env` and answer `/healthz`.
const STARTUP: Duration = Duration::from_secs(30);
/// Enrollments in flight at once: enough to keep the server busy without queueing thousands
/// of requests in its accept backlog.
const ENROLL_CONCURRENCY: usize = 64;

pub(crate) struct Server {
    pub(crate) daemon: Daemon,
    pub(crate) url: String,
    pub(crate) token: String,
    pub(crate) enroll_token: String,
    /// Where it listens: simulated agents connect here from their own source addresses.
    pub(crate) address: SocketAddr,
    pub(crate) client: client::Client,
    http: reqwest::Client,
}

impl Server {
    /// Starts `fleetrun server` on a free loopback port with its data in `dir`.
    pub(crate) async fn start(fleetrun: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data_dir = dir.join("data");
        let args = [
            "server".to_string(),
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        let mut daemon = Daemon::spawn(fleetrun, &args, &dir.join("server.log"), "the server")?;
        let env = wait_for_env_file(&mut daemon, &data_dir.join("server.env")).await?;
        let value = |key: &str| -> anyhow::Result<String> {
            env.get(key)
                .cloned()
                .with_context(|| format!("server.env has no {key}"))
        };
        let url = value("FLEETRUN_URL")?;
        let token = value("FLEETRUN_TOKEN")?;
        let address = url
            .strip_prefix("http://")
            .and_then(|rest| rest.trim_end_matches('/').parse().ok())
            .with_context(|| format!("the server's URL `{url}` is not http://<ip>:<port>"))?;
        let client = client::Client::new(&url, &token).context("building the REST client")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        let server = Self {
            daemon,
            enroll_token: value("FLEETRUN_ENROLL_TOKEN")?,
            url,
            token,
            address,
            client,
            http,
        };
        server.wait_healthy().await?;
        Ok(server)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        let health = format!("{}/healthz", self.url);
        let started = Instant::now();
        while started.elapsed() < STARTUP {
            let response = self.http.get(&health).send().await;
            if response.is_ok_and(|response| response.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "GET /healthz did not answer within {STARTUP:?}; the server's log:\n{}",
            self.daemon.log_tail()
        )
    }

    /// Enrolls machines `names`, at most 64 at once; answers their tokens in the same order.
    pub(crate) async fn enroll(&self, names: Vec<String>) -> anyhow::Result<Vec<String>> {
        futures_util::stream::iter(names)
            .map(|name| self.enroll_one(name))
            .buffered(ENROLL_CONCURRENCY)
            .try_collect()
            .await
    }

    async fn enroll_one(&self, name: String) -> anyhow::Result<String> {
        let request = EnrollRequest {
            hostname: name.clone(),
            name,
            labels: BTreeMap::new(),
            os: "linux".to_string(),
            arch: std::env::consts::ARCH.to_string(),
        };
        let response = self
            .http
            .post(format!("{}/v1/agents/enroll", self.url))
            .bearer_auth(&self.enroll_token)
            .json(&request)
            .send()
            .await
            .with_context(|| format!("enrolling {}", request.name))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("enrolling {}: {status}: {body}", request.name);
        }
        let enrolled: EnrollResponse = response
            .json()
            .await
            .with_context(|| format!("reading the enrollment of {}", request.name))?;
        Ok(enrolled.machine_token)
    }

    /// How many machines `GET /v1/machines` shows online.
    pub(crate) async fn online(&self) -> anyhow::Result<usize> {
        let machines = self.client.machines().await.context("listing machines")?;
        Ok(machines
            .iter()
            .filter(|machine| machine.status == "online")
            .count())
    }

    /// Waits until `expected` machines are online, checking `alive` (are the agents still
    /// there?) between polls; an error after `limit`.
    pub(crate) async fn wait_online(
        &mut self,
        expected: usize,
        limit: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut online = 0;
        while started.elapsed() < limit {
            self.daemon.check_running()?;
            alive()?;
            online = self.online().await?;
            if online >= expected {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("only {online} of {expected} machines online after {limit:?}")
    }
}

/// The `KEY=value` lines of `server.env` once the server has written all three.
async fn wait_for_env_file(
    daemon: &mut Daemon,
    path: &Path,
) -> anyhow::Result<BTreeMap<String, String>> {
    let started = Instant::now();
    while started.elapsed() < STARTUP {
        daemon.check_running()?;
        if let Ok(text) = std::fs::read_to_string(path) {
            let values: BTreeMap<String, String> = text
                .lines()
                .filter_map(|line| line.split_once('='))
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect();
            let complete = ["FLEETRUN_URL", "FLEETRUN_TOKEN", "FLEETRUN_ENROLL_TOKEN"]
                .iter()
                .all(|key| values.contains_key(*key));
            if complete {
                return Ok(values);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "the server did not write {} within {STARTUP:?}; its log:\n{}",
        path.display(),
        daemon.log_tail()
    )
}
