//! `fleetrun server`, `fleetrun agent` and `fleetrun dev`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use server::{Credentials, Server, ServerConfig};
use tokio::sync::watch;

use crate::config::{LimitsFile, ServerFile, limits};

const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// Configuration file (TOML); flags override it.
    #[arg(long, env = "FLEETRUN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the database, output and tokens live [default: ./fleetrun-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitFlags,
}

#[derive(Args, Clone, Default)]
pub(crate) struct LimitFlags {
    /// Largest script accepted [default: 1MiB].
    #[arg(long)]
    max_script_bytes: Option<String>,
    /// Output kept per stream and execution; the rest is dropped and counted [default: 64MiB].
    #[arg(long)]
    output_cap: Option<String>,
    /// Execution timeout of runs that name none [default: 1h].
    #[arg(long)]
    default_timeout: Option<String>,
    /// How long runs wait for offline machines by default [default: 10m].
    #[arg(long)]
    default_delivery_timeout: Option<String>,
}

impl LimitFlags {
    fn as_file(&self) -> LimitsFile {
        LimitsFile {
            max_script_bytes: self.max_script_bytes.clone(),
            output_cap: self.output_cap.clone(),
            default_timeout: self.default_timeout.clone(),
            default_delivery_timeout: self.default_delivery_timeout.clone(),
        }
    }
}

#[derive(Args)]
pub(crate) struct AgentArgs {
    /// The server's URL.
    #[arg(long, env = "FLEETRUN_SERVER")]
    server: String,
    /// Enrollment token; needed only the first time (the credential is kept in the state dir).
    #[arg(long, env = "FLEETRUN_ENROLL_TOKEN", hide_env_values = true)]
    enroll_token: Option<String>,
    /// Machine name [default: the host name].
    #[arg(long)]
    name: Option<String>,
    /// Labels, `key=value,key=value`.
    #[arg(long, default_value = "")]
    labels: String,
    /// Where the agent keeps its credential and journal.
    #[arg(long, default_value = ".fleetrun-agent")]
    state_dir: PathBuf,
    #[command(flatten)]
    tuning: AgentTuning,
}

#[derive(Args, Clone)]
pub(crate) struct AgentTuning {
    /// Most executions run at once; more wait their turn.
    #[arg(long, default_value_t = 4)]
    max_parallel: usize,
    /// Time between TERM and KILL when stopping a script.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    kill_grace: Duration,
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    domain::parse_duration(text)
}

#[derive(Args)]
pub(crate) struct DevArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Where everything lives: database, output, tokens (dev.env) and the local agent's state.
    #[arg(long, default_value = ".fleetrun-dev")]
    data_dir: PathBuf,
    #[command(flatten)]
    limits: LimitFlags,
    #[command(flatten)]
    tuning: AgentTuning,
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A machine name from a host name: the characters a name may not have become `-`.
fn machine_name(hostname: &str) -> String {
    let name: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

pub(crate) async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ServerFile::load(path)?,
        None => ServerFile::default(),
    };
    let limits = limits(&file.limits, &args.limits.as_file())?;
    let listen = match args.listen.or(file.listen) {
        Some(listen) => listen,
        None => DEFAULT_LISTEN.parse().context("default listen address")?,
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("fleetrun-data"));
    let server = Server::start(ServerConfig {
        listen,
        data_dir: data_dir.clone(),
        limits,
    })
    .await?;
    let url = server.url();
    let env_file = data_dir.join("server.env");
    let credentials = Credentials::load_or_create(&server.state, &env_file).await?;
    credentials.write(&env_file, &url)?;
    eprintln!("fleetrun server listening on {url}");
    eprintln!(
        "tokens (admin and enrollment) are in {}",
        env_file.display()
    );
    server.serve(stop_signal()).await
}

pub(crate) async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let labels = domain::parse_labels(&args.labels).context("--labels")?;
    if args.tuning.max_parallel == 0 {
        bail!("--max-parallel must be at least 1");
    }
    let config = agent::AgentConfig {
        server_url: args.server,
        enroll_token: args.enroll_token,
        name: args.name.unwrap_or_else(|| machine_name(&hostname())),
        labels,
        state_dir: args.state_dir,
        max_parallel: args.tuning.max_parallel,
        kill_grace: args.tuning.kill_grace,
    };
    agent::run(config, stop_signal()).await
}

pub(crate) async fn dev(args: DevArgs) -> anyhow::Result<()> {
    if args.tuning.max_parallel == 0 {
        bail!("--max-parallel must be at least 1");
    }
    let limits = limits(&LimitsFile::default(), &args.limits.as_file())?;
    let server = Server::start(ServerConfig {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        limits,
    })
    .await?;
    let url = server.url();
    let env_file = args.data_dir.join("dev.env");
    let credentials = Credentials::load_or_create(&server.state, &env_file).await?;
    credentials.write(&env_file, &url)?;
    print_banner(&url, &env_file, &credentials);

    let (stop, stopped) = watch::channel(false);
    let wait_for_stop = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let serving = tokio::spawn(server.serve(wait_for_stop(stopped.clone())));
    let agent_config = agent::AgentConfig {
        server_url: url.clone(),
        enroll_token: Some(credentials.enroll_token.clone()),
        name: machine_name(&hostname()),
        labels: Default::default(),
        state_dir: args.data_dir.join("agent"),
        max_parallel: args.tuning.max_parallel,
        kill_grace: args.tuning.kill_grace,
    };
    let agent = tokio::spawn(agent::run(agent_config, wait_for_stop(stopped.clone())));

    stop_signal().await;
    eprintln!("stopping");
    let _ = stop.send(true);
    let agent_result = agent.await.context("the local agent panicked")?;
    let server_result = serving.await.context("the server panicked")?;
    agent_result.context("local agent")?;
    server_result
}

fn print_banner(url: &str, env_file: &Path, credentials: &Credentials) {
    println!("fleetrun dev: server listening on {url}, with one local agent");
    println!("The same lines are in {}:", env_file.display());
    println!();
    print!("{}", credentials.env_lines(url, "export "));
    println!();
    println!("Then, in another shell:");
    println!("  fleetrun machines list");
    println!("  fleetrun run --all 'uname -a'");
    println!("Ctrl-C stops it; starting it again on the same data directory keeps everything.");
}

#[cfg(test)]
mod tests {
    use super::machine_name;

    #[test]
    fn host_names_become_machine_names() {
        assert_eq!(machine_name("web-1.example.com"), "web-1.example.com");
        assert_eq!(machine_name("my host"), "my-host");
        assert_eq!(machine_name(""), "localhost");
    }
}
