//! `fleetrun machine-command`: named run commands on one machine (Azure's Run Command
//! resource), from flags or from a raw Azure-style JSON body.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use proto::run_command::{
    ParameterValue, RunCommand, RunCommandParameter, RunCommandProperties, RunCommandSource,
};

use crate::operator::{
    client, fail, given_script, key_value, name_maybe_value, print_json, protected_parameters,
    read_text,
};
use crate::table::{short_time, table};
use crate::{Connection, Format};

#[derive(Subcommand)]
pub(crate) enum MachineCommand {
    /// Create or replace a named run command and run it; a run of the same name still
    /// running is stopped first.
    Put(PutArgs),
    /// Change some properties of a run command and run it again.
    Patch(PutArgs),
    /// How the latest run of a run command went: state, exit code, last 4 KiB of output.
    Get {
        #[command(flatten)]
        connection: Connection,
        machine: String,
        name: String,
    },
    /// A machine's run commands.
    List {
        #[command(flatten)]
        connection: Connection,
        machine: String,
    },
    /// Stop a run command if it runs, and remove it (its runs stay in `fleetrun runs`).
    Delete {
        #[command(flatten)]
        connection: Connection,
        machine: String,
        name: String,
    },
}

#[derive(Args)]
pub(crate) struct PutArgs {
    #[command(flatten)]
    connection: Connection,
    /// The machine, by name or id.
    machine: String,
    /// The run command's name.
    name: String,
    /// The script, inline; `-` reads it from stdin.
    script: Option<String>,
    /// Read the script from a file.
    #[arg(long, short = 'f', conflicts_with = "script")]
    file: Option<PathBuf>,
    /// Send this Azure-style JSON body as it is (`-` reads stdin): `properties.source`,
    /// `parameters`, `asyncExecution`, ... The other property flags cannot be combined with it.
    #[arg(long, conflicts_with_all = ["script", "file", "script_uri", "params",
        "protected_params", "run_as", "timeout", "output_blob_uri", "error_blob_uri",
        "async_execution", "treat_failure_as_deployment_failure"])]
    body: Option<PathBuf>,
    /// Fetch the script on the machine from this HTTP(S) URL.
    #[arg(long, conflicts_with_all = ["script", "file"])]
    script_uri: Option<String>,
    /// Hex SHA-256 the fetched script must have.
    #[arg(long, requires = "script_uri")]
    script_sha256: Option<String>,
    /// A parameter, `name=value`, exported to the script as `$name` (repeatable).
    #[arg(long = "param", short = 'p', value_parser = key_value)]
    params: Vec<(String, String)>,
    /// A protected parameter: exported like `--param`, never shown again. `NAME` alone takes
    /// the value of `$NAME` here.
    #[arg(long = "protected-param", value_parser = name_maybe_value)]
    protected_params: Vec<(String, Option<String>)>,
    /// Run the script as this user (the agent must run as root).
    #[arg(long)]
    run_as: Option<String>,
    /// Execution timeout in seconds [default: 3600].
    #[arg(long)]
    timeout: Option<u64>,
    /// Upload the whole stdout to this pre-signed URL (HTTP PUT) when the script ends.
    #[arg(long)]
    output_blob_uri: Option<String>,
    /// Upload the whole stderr to this pre-signed URL (HTTP PUT) when the script ends.
    #[arg(long)]
    error_blob_uri: Option<String>,
    /// Return once the script has started instead of waiting for its end.
    #[arg(long = "async")]
    async_execution: bool,
    /// Report a failed script as a failed deployment (`provisioningState: Failed`, exit 1).
    #[arg(long)]
    treat_failure_as_deployment_failure: bool,
}

pub(crate) async fn machine_command(command: MachineCommand) -> ExitCode {
    match inner(command).await {
        Ok(code) => code,
        Err(error) => fail(error, 1),
    }
}

async fn inner(command: MachineCommand) -> anyhow::Result<ExitCode> {
    match command {
        MachineCommand::Put(args) => put(args, true).await,
        MachineCommand::Patch(args) => put(args, false).await,
        MachineCommand::Get {
            connection,
            machine,
            name,
        } => {
            let command = client(&connection)?.run_command(&machine, &name).await?;
            show(&command, connection.format)?;
            Ok(ExitCode::SUCCESS)
        }
        MachineCommand::List {
            connection,
            machine,
        } => {
            let commands = client(&connection)?.run_commands(&machine).await?;
            if connection.format == Format::Json {
                print_json(&serde_json::json!({ "value": commands }))?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = table(&["NAME", "STATE", "EXIT", "PROVISIONING", "UPDATED"]);
            for command in &commands {
                let properties = &command.properties;
                table.add_row(vec![
                    command.name.clone(),
                    properties.instance_view.execution_state.clone(),
                    properties
                        .instance_view
                        .exit_code
                        .map_or("-".to_string(), |code| code.to_string()),
                    properties.provisioning_state.clone(),
                    short_time(Some(&properties.updated_at)),
                ]);
            }
            println!("{table}");
            Ok(ExitCode::SUCCESS)
        }
        MachineCommand::Delete {
            connection,
            machine,
            name,
        } => {
            client(&connection)?
                .delete_run_command(&machine, &name)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The body: the `--body` file as it is, or the properties the flags give.
fn body_of(args: &mut PutArgs, replace: bool) -> anyhow::Result<serde_json::Value> {
    if let Some(path) = &args.body {
        let text = read_text(path)?;
        return serde_json::from_str(&text)
            .with_context(|| format!("--body {}: not JSON", path.display()));
    }
    let script = given_script(args.script.as_deref(), args.file.as_deref())?;
    let source = if script.is_some() || args.script_uri.is_some() {
        Some(RunCommandSource {
            script,
            script_uri: args.script_uri.take(),
            script_sha256: args.script_sha256.take(),
            command_id: None,
        })
    } else if replace {
        bail!("give the script inline, as --file FILE, as -, as --script-uri URL, or --body FILE")
    } else {
        None
    };
    let list = |pairs: Vec<(String, String)>| {
        pairs
            .into_iter()
            .map(|(name, value)| RunCommandParameter {
                name,
                value: ParameterValue::Text(value),
            })
            .collect::<Vec<_>>()
    };
    let protected: Vec<(String, String)> =
        protected_parameters(std::mem::take(&mut args.protected_params))?
            .into_iter()
            .collect();
    // A PATCH changes only what is given: empty lists and unset flags are left out.
    let given = |list: Vec<RunCommandParameter>| (replace || !list.is_empty()).then_some(list);
    let properties = RunCommandProperties {
        source,
        parameters: given(list(std::mem::take(&mut args.params))),
        protected_parameters: given(list(protected)),
        async_execution: (replace || args.async_execution).then_some(args.async_execution),
        run_as_user: args.run_as.take(),
        run_as_password: None,
        timeout_in_seconds: args.timeout,
        output_blob_uri: args.output_blob_uri.take(),
        error_blob_uri: args.error_blob_uri.take(),
        treat_failure_as_deployment_failure: (replace || args.treat_failure_as_deployment_failure)
            .then_some(args.treat_failure_as_deployment_failure),
    };
    Ok(serde_json::to_value(properties)?)
}

async fn put(mut args: PutArgs, replace: bool) -> anyhow::Result<ExitCode> {
    let body = body_of(&mut args, replace)?;
    let client = client(&args.connection)?;
    let (status, mut command) = client
        .put_run_command(&args.machine, &args.name, &body, replace, None)
        .await?;
    // The server waits a bounded time; the CLI waits for the end, as Azure's does.
    if status.as_u16() == 202 {
        client
            .wait_run(&command.properties.instance_view.run_id)
            .await?;
        command = client.run_command(&args.machine, &args.name).await?;
    }
    show(&command, args.connection.format)?;
    Ok(if command.properties.provisioning_state == "Failed" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn show(command: &RunCommand, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return print_json(command);
    }
    let properties = &command.properties;
    let view = &properties.instance_view;
    println!("name:          {}", command.name);
    println!("machine:       {}", command.machine);
    let exit = view
        .exit_code
        .map_or(String::new(), |code| format!(" (exit code {code})"));
    println!("state:         {}{exit}", view.execution_state);
    println!("provisioning:  {}", properties.provisioning_state);
    if let Some(message) = &view.execution_message {
        println!("message:       {message}");
    }
    if let Some(code) = &view.error_code {
        println!("error code:    {code}");
    }
    println!("started:       {}", short_time(view.start_time.as_deref()));
    println!("ended:         {}", short_time(view.end_time.as_deref()));
    println!("run:           {}", view.run_id);
    for (title, text) in [("output", &view.output), ("error", &view.error)] {
        if !text.is_empty() {
            println!("--- {title} (last 4 KiB) ---");
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
        }
    }
    Ok(())
}
