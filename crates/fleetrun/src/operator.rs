//! The operator's commands: `run`, `runs ...`, `machines ...`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use client::{Client, RunEvent};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use proto::api::{CreateRun, DurationValue, Execution, LimitValue, Run, TargetsBody};

use crate::table::{first_line, short_time, table};
use crate::{Connection, Format};

/// Exit code of `run` when fleetrun itself failed (as ssh does).
const TOOL_FAILURE: u8 = 255;
/// Exit code of `run` when the script timed out (as timeout(1) does).
const TIMED_OUT: u8 = 124;

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    connection: Connection,
    /// The script, inline; `-` reads it from stdin.
    script: Option<String>,
    /// Read the script from a file.
    #[arg(long, short = 'f', conflicts_with = "script")]
    file: Option<PathBuf>,
    /// A target machine, by name or id (repeatable).
    #[arg(long = "machine", short = 'm')]
    machines: Vec<String>,
    /// Every machine whose labels match, e.g. `env=prod,role=web`.
    #[arg(long)]
    select: Option<String>,
    /// Every enrolled machine.
    #[arg(long)]
    all: bool,
    /// Program to run the script with [default: the script's #! line, else bash, else sh].
    #[arg(long)]
    interpreter: Option<String>,
    /// A parameter, `name=value`: replaces `{{name}}` in the script and is exported as `$name`.
    #[arg(long = "param", short = 'p', value_parser = key_value)]
    params: Vec<(String, String)>,
    /// An environment variable for the script, `KEY=value`.
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    env: Vec<(String, String)>,
    /// Working directory on the machine [default: a fresh directory per execution].
    #[arg(long)]
    workdir: Option<String>,
    /// Execution timeout, e.g. `90s`, `10m` [default: 1h].
    #[arg(long)]
    timeout: Option<String>,
    /// How long to wait for an offline machine to connect [default: 10m].
    #[arg(long)]
    delivery_timeout: Option<String>,
    /// Most executions in flight at once: a count, or a percentage of the targets (`10%`)
    /// [default: no limit].
    #[arg(long)]
    max_concurrency: Option<String>,
    /// Failures allowed before the executions not yet sent are skipped: a count, or a
    /// percentage of the targets [default: no limit].
    #[arg(long)]
    max_errors: Option<String>,
    /// Fetch the script on the machine from this HTTP(S) URL instead of giving it here.
    #[arg(long, conflicts_with_all = ["script", "file"])]
    script_uri: Option<String>,
    /// Hex SHA-256 the fetched script must have.
    #[arg(long, requires = "script_uri")]
    script_sha256: Option<String>,
    /// Upload each execution's whole stdout to this pre-signed URL (HTTP PUT) when it ends.
    #[arg(long)]
    output_blob_uri: Option<String>,
    /// Upload each execution's whole stderr to this pre-signed URL (HTTP PUT) when it ends.
    #[arg(long)]
    error_blob_uri: Option<String>,
    /// A protected parameter, exported like `--param` but never shown again. `NAME` alone
    /// takes the value of `$NAME` here, which keeps it off the command line (`ps` shows that).
    #[arg(long = "protected-param", value_parser = name_maybe_value)]
    protected_params: Vec<(String, Option<String>)>,
    /// Run the script as this user (the agent must run as root).
    #[arg(long)]
    run_as: Option<String>,
    /// Print the run id and return without waiting.
    #[arg(long)]
    no_wait: bool,
}

pub(crate) fn name_maybe_value(text: &str) -> Result<(String, Option<String>), String> {
    Ok(match text.split_once('=') {
        Some((name, value)) => (name.to_string(), Some(value.to_string())),
        None => (text.to_string(), None),
    })
}

/// Protected parameters with their values: given, or read from this process's environment.
pub(crate) fn protected_parameters(
    given: Vec<(String, Option<String>)>,
) -> anyhow::Result<BTreeMap<String, String>> {
    given
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                Some(value) => value,
                None => std::env::var(&name).map_err(|_| {
                    anyhow::anyhow!(
                        "--protected-param {name}: give NAME=VALUE, or set ${name} in the environment"
                    )
                })?,
            };
            Ok((name, value))
        })
        .collect()
}

pub(crate) fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("`{text}` must be written name=value"))
}

#[derive(Subcommand)]
pub(crate) enum RunsCommand {
    /// Recent runs, newest first.
    List {
        #[command(flatten)]
        connection: Connection,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One run: each machine's state, exit code and times.
    Show {
        #[command(flatten)]
        connection: Connection,
        run: String,
    },
    /// The full output of one machine's execution of a run.
    Output {
        #[command(flatten)]
        connection: Connection,
        run: String,
        /// The machine, by name or id (may be left out when the run has one machine).
        #[arg(long, short = 'm')]
        machine: Option<String>,
        /// Print stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing as output arrives, until the execution ends.
        #[arg(long, short = 'F')]
        follow: bool,
    },
    /// Cancel a run: undelivered executions are skipped, running ones stopped.
    Cancel {
        #[command(flatten)]
        connection: Connection,
        run: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum MachinesCommand {
    /// Every enrolled machine.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// One machine's details.
    Show {
        #[command(flatten)]
        connection: Connection,
        machine: String,
    },
    /// Remove a machine: its agent is disconnected and its credential revoked.
    Delete {
        #[command(flatten)]
        connection: Connection,
        machine: String,
    },
}

pub(crate) fn client(connection: &Connection) -> anyhow::Result<Client> {
    let token = connection.token.as_deref().ok_or_else(|| {
        anyhow!("no API token: pass --token or set FLEETRUN_TOKEN (fleetrun dev writes it to .fleetrun-dev/dev.env)")
    })?;
    Ok(Client::new(&connection.url, token)?)
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn fail(error: anyhow::Error, code: u8) -> ExitCode {
    eprintln!("fleetrun: {error:#}");
    ExitCode::from(code)
}

/// The script given inline, as `-` (stdin) or with `--file`, if any.
pub(crate) fn given_script(
    inline: Option<&str>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    match (inline, file) {
        (Some("-"), None) => read_text(std::path::Path::new("-")).map(Some),
        (Some(text), None) => Ok(Some(text.to_string())),
        (None, Some(path)) => read_text(path).map(Some),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => bail!("give the script inline or with --file, not both"),
    }
}

/// A file's text; `-` reads stdin.
pub(crate) fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

pub(crate) async fn run(args: RunArgs) -> ExitCode {
    match run_inner(args).await {
        Ok(code) => code,
        Err(error) => fail(error, TOOL_FAILURE),
    }
}

async fn run_inner(args: RunArgs) -> anyhow::Result<ExitCode> {
    let script = match given_script(args.script.as_deref(), args.file.as_deref())? {
        Some(script) => script,
        None if args.script_uri.is_some() => String::new(),
        None => bail!(
            "give the script inline, as --file FILE, as - to read stdin, or as --script-uri URL"
        ),
    };
    let client = client(&args.connection)?;
    let request = CreateRun {
        targets: TargetsBody {
            machines: args.machines,
            selector: args.select,
            all: args.all,
        },
        script,
        interpreter: args.interpreter,
        parameters: args.params.into_iter().collect::<BTreeMap<_, _>>(),
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        workdir: args.workdir,
        timeout: args.timeout.map(DurationValue::Text),
        delivery_timeout: args.delivery_timeout.map(DurationValue::Text),
        max_concurrency: args.max_concurrency.map(LimitValue::Text),
        max_errors: args.max_errors.map(LimitValue::Text),
        script_uri: args.script_uri,
        script_sha256: args.script_sha256,
        output_blob_uri: args.output_blob_uri,
        error_blob_uri: args.error_blob_uri,
        protected_parameters: protected_parameters(args.protected_params)?,
        run_as_user: args.run_as,
    };
    let json = args.connection.format == Format::Json;
    let run = client.create_run(&request).await?;
    if args.no_wait {
        if json {
            print_json(&run)?;
        } else {
            println!("{}", run.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let executions = run.executions.clone().unwrap_or_default();
    let waited = async {
        if executions.len() == 1 && !json {
            single_target(&client, &executions[0]).await
        } else {
            many_targets(&client, &run.id, json).await
        }
    };
    tokio::select! {
        result = waited => result,
        _ = tokio::signal::ctrl_c() => {
            client.cancel_run(&run.id).await?;
            eprintln!("fleetrun: canceled run {}", run.id);
            Ok(ExitCode::from(130))
        }
    }
}

/// Like ssh: the remote stdout to stdout, stderr to stderr, as it happens, and the remote exit
/// code as ours.
async fn single_target(client: &Client, execution: &Execution) -> anyhow::Result<ExitCode> {
    let stdout = copy_output(client, &execution.id, "stdout", std::io::stdout());
    let stderr = copy_output(client, &execution.id, "stderr", std::io::stderr());
    let (stdout, stderr) = tokio::join!(stdout, stderr);
    stdout?;
    stderr?;
    let execution = client.execution(&execution.id).await?;
    Ok(exit_code_of(&execution))
}

async fn copy_output(
    client: &Client,
    execution: &str,
    stream: &str,
    mut sink: impl Write,
) -> anyhow::Result<()> {
    let mut chunks = Box::pin(client.output(execution, stream, 0, true).await?);
    while let Some(chunk) = chunks.next().await {
        sink.write_all(&chunk?)?;
        sink.flush()?;
    }
    Ok(())
}

fn exit_code_of(execution: &Execution) -> ExitCode {
    match (execution.state.as_str(), execution.exit_code) {
        ("succeeded", _) => ExitCode::SUCCESS,
        ("failed", Some(code)) if execution.message.is_none() => {
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        (state, code) => {
            let why = execution.message.as_deref().unwrap_or("");
            eprintln!(
                "fleetrun: {} ended as {state}. {why}",
                execution.machine_name
            );
            match (state, code) {
                ("timed_out", _) => ExitCode::from(TIMED_OUT),
                (_, Some(code)) => ExitCode::from(code.clamp(0, 255) as u8),
                _ => ExitCode::from(TOOL_FAILURE),
            }
        }
    }
}

/// Waits for the whole run, then prints each machine's result.
async fn many_targets(client: &Client, run_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    // Progress only for a person watching: not on a pipe, not with -o json.
    let show_progress = !json && std::io::stderr().is_terminal();
    let run = wait_with_progress(client, run_id, show_progress).await?;
    let ok = run.status == "succeeded";
    if json {
        print_json(&run)?;
    } else {
        print_results(client, &run).await?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe(execution: &Execution) -> String {
    let mut text = execution.state.clone();
    if let Some(code) = execution.exit_code {
        text.push_str(&format!(", exit {code}"));
    }
    if let Some(code) = &execution.error_code {
        text.push_str(&format!(" [{code}]"));
    }
    if let Some(message) = &execution.message {
        text.push_str(&format!(": {message}"));
    }
    text
}

/// Follows the run's event stream until it is over, drawing counts and a bar on stderr if
/// `show` is set.
async fn wait_with_progress(client: &Client, run_id: &str, show: bool) -> anyhow::Result<Run> {
    let mut events = Box::pin(client.run_events(run_id).await?);
    let bar = if show {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} done  {msg}  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let show = |bar: &ProgressBar, counts: &BTreeMap<String, u64>| {
        let done: u64 = counts
            .iter()
            .filter(|(state, _)| is_terminal(state))
            .map(|(_, n)| n)
            .sum();
        bar.set_position(done);
        let text: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        bar.set_message(text.join(", "));
    };
    while let Some(event) = events.next().await {
        match event? {
            RunEvent::Run(run) => {
                bar.set_length(run.total);
                counts = run.counts;
                show(&bar, &counts);
            }
            RunEvent::Execution(change) => {
                if let Some(n) = counts.get_mut(&change.previous_state) {
                    *n = n.saturating_sub(1);
                }
                *counts.entry(change.state).or_default() += 1;
                show(&bar, &counts);
            }
            RunEvent::Done(_) => break,
        }
    }
    bar.finish_and_clear();
    // The details (every execution's tail) come from the run itself.
    Ok(client.run(run_id, None).await?)
}

fn is_terminal(state: &str) -> bool {
    !matches!(state, "pending" | "delivered" | "running")
}

async fn print_results(client: &Client, run: &Run) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for execution in run.executions.as_deref().unwrap_or_default() {
        writeln!(
            out,
            "== {} ({})",
            execution.machine_name,
            describe(execution)
        )?;
        for (stream, size, tail) in [
            ("stdout", execution.stdout_bytes, &execution.stdout_tail),
            ("stderr", execution.stderr_bytes, &execution.stderr_tail),
        ] {
            if size == 0 {
                continue;
            }
            // Short output is all in the tail (exact when it is valid UTF-8, which its length
            // and the absence of replacement characters show); anything longer is fetched.
            let whole_in_tail = size as usize == tail.len() && !tail.contains('\u{FFFD}');
            let bytes = if whole_in_tail {
                tail.as_bytes().to_vec()
            } else {
                client.output_bytes(&execution.id, stream).await?
            };
            if stream == "stderr" {
                writeln!(out, "-- stderr")?;
            }
            out.write_all(&bytes)?;
            if !bytes.ends_with(b"\n") {
                writeln!(out)?;
            }
        }
    }
    let counts: Vec<String> = run
        .counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    writeln!(
        out,
        "run {}: {} ({})",
        run.id,
        run.status,
        counts.join(", ")
    )?;
    if let Some(reason) = &run.stop_reason {
        writeln!(out, "stopped early: {reason}")?;
    }
    Ok(())
}

pub(crate) async fn runs(command: RunsCommand) -> ExitCode {
    match runs_inner(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error, 1),
    }
}

async fn runs_inner(command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List { connection, limit } => {
            let list = client(&connection)?.runs(limit, None).await?;
            if connection.format == Format::Json {
                return print_json(&list);
            }
            let mut table = table(&["ID", "STATUS", "CREATED", "TARGETS", "EXECUTIONS", "SCRIPT"]);
            for run in &list.runs {
                let targets = if run.targets.all {
                    "all".to_string()
                } else if let Some(selector) = &run.targets.selector {
                    selector.clone()
                } else {
                    run.targets.machines.join(",")
                };
                let counts: Vec<String> = run
                    .counts
                    .iter()
                    .map(|(state, n)| format!("{n} {state}"))
                    .collect();
                table.add_row(vec![
                    run.id.clone(),
                    run.status.clone(),
                    short_time(Some(&run.created_at)),
                    targets,
                    counts.join(", "),
                    first_line(&run.script, 40),
                ]);
            }
            println!("{table}");
        }
        RunsCommand::Show { connection, run } => {
            let run = client(&connection)?.run(&run, None).await?;
            if connection.format == Format::Json {
                return print_json(&run);
            }
            println!(
                "run {}  {}  created {}",
                run.id,
                run.status,
                short_time(Some(&run.created_at))
            );
            println!("script: {}", first_line(&run.script, 70));
            let mut table = table(&[
                "MACHINE", "STATE", "EXIT", "STARTED", "FINISHED", "OUTPUT", "MESSAGE",
            ]);
            for execution in run.executions.as_deref().unwrap_or_default() {
                table.add_row(vec![
                    execution.machine_name.clone(),
                    execution.state.clone(),
                    execution
                        .exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    short_time(execution.started_at.as_deref()),
                    short_time(execution.finished_at.as_deref()),
                    format!("{}B/{}B", execution.stdout_bytes, execution.stderr_bytes),
                    execution.message.clone().unwrap_or_default(),
                ]);
            }
            println!("{table}");
        }
        RunsCommand::Output {
            connection,
            run,
            machine,
            stderr,
            follow,
        } => {
            let client = client(&connection)?;
            let run = client.run(&run, None).await?;
            let executions = run.executions.unwrap_or_default();
            let execution = match &machine {
                Some(machine) => executions
                    .iter()
                    .find(|e| &e.machine_name == machine || &e.machine_id == machine)
                    .ok_or_else(|| {
                        anyhow!("run {} has no execution on machine `{machine}`", run.id)
                    })?,
                None if executions.len() == 1 => &executions[0],
                None => bail!(
                    "run {} ran on {} machines: name one with --machine",
                    run.id,
                    executions.len()
                ),
            };
            let stream = if stderr { "stderr" } else { "stdout" };
            copy_output_to_stdout(&client, &execution.id, stream, follow).await?;
        }
        RunsCommand::Cancel { connection, run } => {
            let run = client(&connection)?.cancel_run(&run).await?;
            if connection.format == Format::Json {
                return print_json(&run);
            }
            println!("run {}: {}", run.id, run.status);
        }
    }
    Ok(())
}

async fn copy_output_to_stdout(
    client: &Client,
    execution: &str,
    stream: &str,
    follow: bool,
) -> anyhow::Result<()> {
    let mut chunks = Box::pin(client.output(execution, stream, 0, follow).await?);
    let mut out = std::io::stdout();
    while let Some(chunk) = chunks.next().await {
        out.write_all(&chunk?)?;
        out.flush()?;
    }
    Ok(())
}

pub(crate) async fn machines(command: MachinesCommand) -> ExitCode {
    match machines_inner(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error, 1),
    }
}

async fn machines_inner(command: MachinesCommand) -> anyhow::Result<()> {
    match command {
        MachinesCommand::List { connection } => {
            let machines = client(&connection)?.machines().await?;
            if connection.format == Format::Json {
                return print_json(&serde_json::json!({ "machines": machines }));
            }
            let mut table = table(&[
                "NAME",
                "ID",
                "LABELS",
                "OS/ARCH",
                "VERSION",
                "STATUS",
                "LAST SEEN",
            ]);
            for machine in &machines {
                let labels: Vec<String> = machine
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                table.add_row(vec![
                    machine.name.clone(),
                    machine.id.clone(),
                    labels.join(","),
                    format!("{}/{}", machine.os, machine.arch),
                    machine.agent_version.clone(),
                    machine.status.clone(),
                    short_time(machine.last_seen_at.as_deref()),
                ]);
            }
            println!("{table}");
        }
        MachinesCommand::Show {
            connection,
            machine,
        } => {
            let machine = client(&connection)?.machine(&machine).await?;
            if connection.format == Format::Json {
                return print_json(&machine);
            }
            let labels: Vec<String> = machine
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("name:          {}", machine.name);
            println!("id:            {}", machine.id);
            println!("status:        {}", machine.status);
            println!("labels:        {}", labels.join(","));
            println!("hostname:      {}", machine.hostname);
            println!("os/arch:       {}/{}", machine.os, machine.arch);
            println!("agent version: {}", machine.agent_version);
            println!("interpreters:  {}", machine.interpreters.join(", "));
            println!("enrolled:      {}", short_time(Some(&machine.enrolled_at)));
            println!(
                "last seen:     {}",
                short_time(machine.last_seen_at.as_deref())
            );
        }
        MachinesCommand::Delete {
            connection,
            machine,
        } => {
            client(&connection)?.delete_machine(&machine).await?;
            println!("deleted {machine}");
        }
    }
    Ok(())
}
