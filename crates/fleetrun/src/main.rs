//! `fleetrun`: the one binary. `server`, `agent` and `dev` run the parts; the other commands
//! are the operator's CLI over the REST API.

mod config;
mod daemons;
mod machine_command;
mod operator;
mod table;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "fleetrun",
    version,
    about = "Run scripts on fleets of machines",
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the operator commands find the server.
#[derive(Args, Clone)]
pub(crate) struct Connection {
    /// Server URL.
    #[arg(
        long,
        env = "FLEETRUN_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    url: String,
    /// API token (`fleetrun dev` writes one to <data-dir>/dev.env).
    #[arg(long, env = "FLEETRUN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table, global = true)]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (REST API and agent gateway).
    Server(daemons::ServerArgs),
    /// Run the agent on this machine.
    Agent(daemons::AgentArgs),
    /// Run a server and one local agent on SQLite, ready to use.
    Dev(daemons::DevArgs),
    /// Run a script on one machine, a list, or every machine matching labels.
    Run(Box<operator::RunArgs>),
    /// List, show and cancel runs; read their output.
    #[command(subcommand)]
    Runs(operator::RunsCommand),
    /// Named run commands on one machine (Azure's Run Command resource): put, patch, get,
    /// list, delete.
    #[command(subcommand)]
    MachineCommand(machine_command::MachineCommand),
    /// List, show and delete machines.
    #[command(subcommand)]
    Machines(operator::MachinesCommand),
    /// Print the OpenAPI document of the REST API.
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Dev(_)
    );
    init_logging(daemon);
    let runtime = match cli.command {
        // An agent does little at a time: one thread keeps it small.
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fleetrun: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => report(daemons::server(args).await),
            Command::Agent(args) => report(daemons::agent(args).await),
            Command::Dev(args) => report(daemons::dev(args).await),
            Command::Run(args) => operator::run(*args).await,
            Command::Runs(command) => operator::runs(command).await,
            Command::Machines(command) => operator::machines(command).await,
            Command::MachineCommand(command) => machine_command::machine_command(command).await,
            Command::Openapi => {
                println!("{}", openapi_json());
                ExitCode::SUCCESS
            }
        }
    })
}

/// The OpenAPI document as committed in `docs/openapi.json`.
pub(crate) fn openapi_json() -> String {
    server::openapi()
        .to_pretty_json()
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleetrun: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if daemon {
        "info,sqlx=warn,tower_http=warn"
    } else {
        "warn"
    };
    let mut filter =
        EnvFilter::try_from_env("FLEETRUN_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // At trace level the WebSocket library prints every frame whole, and frames carry
    // protected parameters: no filter, however verbose, turns that on.
    for quiet in ["tungstenite=debug", "tokio_tungstenite=debug"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
