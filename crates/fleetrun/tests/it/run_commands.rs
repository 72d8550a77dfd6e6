//! Named run commands (`/v1/machines/{m}/run-commands/{name}`, Azure's Run Command resource)
//! through the REST API and the CLI: Azure bodies as they are, replace and delete while
//! running, the resource across a server restart, and secrets that never come back.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Cluster, group_alive, read_pid, run_cli, wait_until};

const COMMANDS: &str = "/v1/machines/web-1/run-commands";

/// Sends `body` (if any) as the admin: the status, the `Location` header and the JSON answer.
fn send(
    cluster: &Cluster,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Option<String>, Value) {
    let mut request = cluster.request(method.clone(), path, Some(&cluster.token));
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let text = response.text().expect("body");
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{method} {path}: not JSON ({error}): {text}"))
    };
    (status, location, value)
}

fn put(cluster: &Cluster, name: &str, body: &Value) -> (u16, Value) {
    let (status, _, value) = send(
        cluster,
        Method::PUT,
        &format!("{COMMANDS}/{name}"),
        Some(body),
    );
    (status, value)
}

fn get(cluster: &Cluster, name: &str) -> (u16, Value) {
    let (status, _, value) = send(cluster, Method::GET, &format!("{COMMANDS}/{name}"), None);
    (status, value)
}

fn view(command: &Value) -> &Value {
    &command["properties"]["instanceView"]
}

/// A script that prints whether process group `group` still has a live member: zombies aside
/// (an orphan that died may wait for a reaper that never comes, here as for the agent). Each
/// `/proc/*/stat` is read on its own (a process may vanish in between) and split after the
/// command name, which may hold spaces.
fn live_group_check(group: i32) -> String {
    format!(
        r#"alive=gone
for stat in /proc/[0-9]*/stat; do
  fields=$(cat "$stat" 2>/dev/null) || continue
  set -- ${{fields##*) }}
  if [ "$3" = {group} ] && [ "$1" != Z ]; then alive=still-running; fi
done
echo "$alive""#
    )
}

/// Starts `name` as a script that ignores SIGTERM (so only SIGKILL after the 1 s kill grace
/// ends it: a run that started at once would see it alive) and returns its process group.
fn start_stubborn(cluster: &Cluster, name: &str) -> (Value, i32) {
    let pid_file = cluster.scratch_dir(name).join("group.pid");
    let (status, command) = put(
        cluster,
        name,
        &json!({
            "source": {"script": format!("trap '' TERM; echo $$ > {}; sleep 300", pid_file.display())},
            "asyncExecution": true
        }),
    );
    assert!(status == 200 || status == 201, "{command}");
    let group = read_pid(&pid_file);
    cluster.kill_group_on_drop(group);
    (command, group)
}

fn one_agent() -> Cluster {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    cluster
}

/// Waits until the run command's latest execution is in fleetrun state `state`.
fn wait_command_state(cluster: &Cluster, name: &str, state: &str) -> Value {
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(20),
        &format!("run command {name} is {state}"),
        || {
            last = get(cluster, name).1;
            view(&last)["state"] == state
        },
    );
    last
}

/// Azure's own example (the Arc run-command page, example 1) with its Windows firewall script
/// swapped for a shell one, and without `runAsUser`/`runAsPassword` and the blob URIs, which
/// name a user and a storage account that do not exist here: the rest (the `location` and
/// `properties` wrapper, the `{name, value}` lists with a number among the values,
/// `asyncExecution`, `timeoutInSeconds`, `api-version`) goes as it is.
#[test]
fn the_azure_example_body_runs_as_it_is_and_the_resource_lives_on() {
    let cluster = one_agent();
    let body = json!({
      "location": "eastus2",
      "properties": {
        "source": {
          "script": "echo \"rule=$ruleName endpoint=$endpoint port=$port protocol=$protocol\"; echo to-stderr >&2"
        },
        "parameters": [
          { "name": "ruleName", "value": " Allow access to microsoft.com/pkiops/certs" },
          { "name": "endpoint", "value": "microsoft.com/pkiops/certs" },
          { "name": "port", "value": 433 },
          { "name": "protocol", "value": "TCP" }
        ],
        "asyncExecution": false,
        "timeoutInSeconds": 3600
      }
    });
    let path = format!("{COMMANDS}/EndpointAccessCommand?api-version=2023-10-03-preview");
    let (status, _, created) = send(&cluster, Method::PUT, &path, Some(&body));
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "EndpointAccessCommand");
    let properties = &created["properties"];
    assert_eq!(properties["provisioningState"], "Succeeded", "{created}");
    assert_eq!(properties["timeoutInSeconds"], 3600);
    assert_eq!(properties["asyncExecution"], false);
    let parameters = properties["parameters"].as_array().expect("parameters");
    assert!(
        parameters.contains(&json!({"name": "port", "value": "433"})),
        "{created}"
    );
    let instance = view(&created);
    assert_eq!(instance["executionState"], "Succeeded");
    assert_eq!(instance["exitCode"], 0);
    assert_eq!(
        instance["output"],
        "rule= Allow access to microsoft.com/pkiops/certs endpoint=microsoft.com/pkiops/certs port=433 protocol=TCP\n"
    );
    assert_eq!(instance["error"], "to-stderr\n");
    assert!(instance["startTime"].is_string() && instance["endTime"].is_string());
    let first_run = instance["runId"].as_str().expect("run id").to_string();
    // The full output is one link away.
    let full = cluster.output(instance["executionId"].as_str().expect("id"), "stdout");
    assert!(String::from_utf8_lossy(&full).starts_with("rule= Allow"));

    let (status, shown) = get(&cluster, "EndpointAccessCommand");
    assert_eq!(status, 200);
    assert_eq!(view(&shown)["output"], instance["output"]);
    let (status, _, list) = send(&cluster, Method::GET, COMMANDS, None);
    assert_eq!(status, 200);
    assert_eq!(list["value"].as_array().map(Vec::len), Some(1), "{list}");

    // PUT again replaces and runs again: 200, a new run, the old one in the history.
    let (status, replaced) = put(&cluster, "EndpointAccessCommand", &body);
    assert_eq!(status, 200, "{replaced}");
    assert_ne!(view(&replaced)["runId"], first_run.as_str());

    // PATCH changes what it names and keeps the rest.
    let patch = json!({"parameters": [{"name": "ruleName", "value": "patched"}]});
    let (status, _, patched) = send(
        &cluster,
        Method::PATCH,
        &format!("{COMMANDS}/EndpointAccessCommand"),
        Some(&patch),
    );
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        view(&patched)["output"],
        "rule=patched endpoint= port= protocol=\n"
    );
    assert_eq!(patched["properties"]["timeoutInSeconds"], 3600);

    let (status, _, _) = send(
        &cluster,
        Method::DELETE,
        &format!("{COMMANDS}/EndpointAccessCommand"),
        None,
    );
    assert_eq!(status, 204);
    let (status, gone) = get(&cluster, "EndpointAccessCommand");
    assert_eq!(status, 404);
    assert_eq!(gone["error"]["code"], "RunCommandNotFound");
    // Its runs stay in the history.
    let run = cluster.get_json(&format!("/v1/runs/{first_run}"));
    assert_eq!(run["status"], "succeeded");
}

#[test]
fn replacing_a_running_command_stops_its_process_group_before_the_new_one_starts() {
    let cluster = one_agent();
    let (old, group) = start_stubborn(&cluster, "long");

    let check = live_group_check(group);
    let (status, new) = put(&cluster, "long", &json!({"source": {"script": check}}));
    assert_eq!(status, 200, "{new}");
    assert_eq!(view(&new)["output"], "gone\n", "{new}");
    assert!(!group_alive(group));
    let old_run = cluster.get_json(&format!(
        "/v1/runs/{}",
        view(&old)["runId"].as_str().expect("run id")
    ));
    assert_eq!(old_run["executions"][0]["state"], "canceled", "{old_run}");
}

/// Deleting a name and putting it again, while the first script is still dying, still waits
/// for it: every open run of the name is replaced, not just the latest. Names are
/// case-insensitive, as Azure's are.
#[test]
fn a_new_command_of_a_deleted_name_waits_for_the_old_script_too() {
    let cluster = one_agent();
    let (_, group) = start_stubborn(&cluster, "Deploy");
    let (status, _, _) = send(
        &cluster,
        Method::DELETE,
        &format!("{COMMANDS}/Deploy"),
        None,
    );
    assert_eq!(status, 204);
    let (status, again) = put(
        &cluster,
        "deploy",
        &json!({"source": {"script": live_group_check(group)}}),
    );
    assert_eq!(status, 201, "{again}");
    assert_eq!(view(&again)["output"], "gone\n", "{again}");

    // `DEPLOY` is the same command as `deploy`, and keeps the name it was created with.
    let (status, shown) = get(&cluster, "DEPLOY");
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["name"], "deploy");
    let (_, _, list) = send(&cluster, Method::GET, COMMANDS, None);
    assert_eq!(list["value"].as_array().map(Vec::len), Some(1), "{list}");
}

#[test]
fn deleting_a_running_command_stops_it_and_removes_it() {
    let cluster = one_agent();
    let dir = cluster.scratch_dir("delete");
    let pid_file = dir.join("group.pid");
    let (status, command) = put(
        &cluster,
        "long",
        &json!({
            "source": {"script": format!("echo $$ > {}; sleep 300", pid_file.display())},
            "asyncExecution": true
        }),
    );
    assert_eq!(status, 201, "{command}");
    // Creating until the script starts, which may already have happened.
    let provisioning = &command["properties"]["provisioningState"];
    assert!(
        provisioning == "Creating" || provisioning == "Succeeded",
        "{command}"
    );
    let group = read_pid(&pid_file);
    cluster.kill_group_on_drop(group);
    let running = wait_command_state(&cluster, "long", "running");
    assert_eq!(view(&running)["executionState"], "Running");
    assert_eq!(running["properties"]["provisioningState"], "Succeeded");

    let (status, _, _) = send(&cluster, Method::DELETE, &format!("{COMMANDS}/long"), None);
    assert_eq!(status, 204);
    wait_until(
        Duration::from_secs(15),
        "the script's group is gone",
        || !group_alive(group),
    );
    assert_eq!(get(&cluster, "long").0, 404);
    let run_id = view(&command)["runId"]
        .as_str()
        .expect("run id")
        .to_string();
    let run = cluster.wait_run(&run_id);
    assert_eq!(run["executions"][0]["state"], "canceled", "{run}");
}

#[test]
fn a_run_command_survives_a_server_restart() {
    let mut cluster = one_agent();
    let (status, created) = put(
        &cluster,
        "hello",
        &json!({"source": {"script": "echo hello from $who"}, "parameters": [{"name": "who", "value": "web-1"}]}),
    );
    assert_eq!(status, 201, "{created}");
    cluster.restart_server(true);
    let (status, shown) = get(&cluster, "hello");
    assert_eq!(status, 200, "{shown}");
    assert_eq!(view(&shown)["output"], "hello from web-1\n");
    assert_eq!(view(&shown)["runId"], view(&created)["runId"]);
    assert_eq!(shown["properties"]["provisioningState"], "Succeeded");
}

#[test]
fn a_sync_put_answers_202_with_the_url_when_the_wait_runs_out() {
    let cluster = one_agent();
    let (status, location, accepted) = send(
        &cluster,
        Method::PUT,
        &format!("{COMMANDS}/slow?wait=100ms"),
        Some(&json!({"source": {"script": "sleep 1; echo done"}})),
    );
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(
        location.as_deref(),
        Some("/v1/machines/web-1/run-commands/slow")
    );
    assert_eq!(accepted["properties"]["provisioningState"], "Creating");
    let done = wait_command_state(&cluster, "slow", "succeeded");
    assert_eq!(view(&done)["output"], "done\n");
    assert_eq!(done["properties"]["provisioningState"], "Succeeded");
}

#[test]
fn a_failed_script_fails_the_deployment_only_when_asked() {
    let cluster = one_agent();
    let (_, tolerated) = put(&cluster, "fails", &json!({"source": {"script": "exit 3"}}));
    assert_eq!(view(&tolerated)["executionState"], "Failed");
    assert_eq!(view(&tolerated)["exitCode"], 3);
    assert_eq!(tolerated["properties"]["provisioningState"], "Succeeded");

    let (_, failed) = put(
        &cluster,
        "fails",
        &json!({"source": {"script": "exit 3"}, "treatFailureAsDeploymentFailure": true}),
    );
    assert_eq!(view(&failed)["exitCode"], 3);
    assert_eq!(
        failed["properties"]["provisioningState"], "Failed",
        "{failed}"
    );

    // A script that times out is TimedOut.
    let (_, timed_out) = put(
        &cluster,
        "slow",
        &json!({"source": {"script": "sleep 30"}, "timeoutInSeconds": 1}),
    );
    assert_eq!(
        view(&timed_out)["executionState"],
        "TimedOut",
        "{timed_out}"
    );
}

#[test]
fn protected_parameters_and_passwords_never_come_back() {
    // Everything the daemons can log, so that a secret in a trace line is caught too.
    let mut cluster = Cluster::start_logging(&[], Some("trace"));
    cluster.agent("web-1", "");
    let (status, command) = put(
        &cluster,
        "secret",
        &json!({"properties": {
            "source": {"script": "[ \"$token\" = \"$(printf 's3cr3t-%s' value)\" ] && echo token-arrived; [ -n \"{{token}}\" ] && echo templated"},
            "protectedParameters": [{"name": "token", "value": "s3cr3t-value"}],
            "runAsPassword": "hunter2-password"
        }}),
    );
    assert_eq!(status, 201, "{command}");
    assert_eq!(view(&command)["output"], "token-arrived\ntemplated\n");
    assert_eq!(
        command["properties"]["protectedParameters"],
        json!([{"name": "token"}])
    );
    let run_id = view(&command)["runId"]
        .as_str()
        .expect("run id")
        .to_string();
    let shown = [
        command.to_string(),
        get(&cluster, "secret").1.to_string(),
        send(&cluster, Method::GET, COMMANDS, None).2.to_string(),
        cluster.get_json(&format!("/v1/runs/{run_id}")).to_string(),
        cluster.get_json("/v1/runs").to_string(),
        cluster.fleetrun(&["runs", "show", &run_id]).stdout_text(),
        cluster
            .fleetrun(&["machine-command", "get", "web-1", "secret", "-o", "json"])
            .stdout_text(),
    ];
    // `fleetrun run --protected-param NAME` takes the value from the CLI's environment.
    let run = run_cli(
        &[
            "run",
            "-m",
            "web-1",
            "--protected-param",
            "token",
            "[ \"$token\" = \"$(printf 's3cr3t-%s' value)\" ] && echo cli-token-arrived",
        ],
        &[
            ("FLEETRUN_URL", &cluster.url),
            ("FLEETRUN_TOKEN", &cluster.token),
            ("token", "s3cr3t-value"),
        ],
        None,
    );
    assert_eq!(run.success(), "cli-token-arrived\n");
    let newest = cluster.get_json(&format!("/v1/runs/{}", cluster.newest_run_id()));
    assert_eq!(newest["protected_parameters"], json!(["token"]));
    assert!(!newest.to_string().contains("s3cr3t-value"));

    for log in ["server.log", "agent-web-1.log"] {
        let path = cluster.dir().join("logs").join(log);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.is_empty(), "{} is empty", path.display());
        let leaks: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("s3cr3t-value"))
            .collect();
        assert!(leaks.is_empty(), "{log} shows the secret: {leaks:#?}");
        assert!(!text.contains("hunter2"), "{log} shows the password");
    }
    for text in shown {
        assert!(!text.contains("s3cr3t-value"), "a secret came back: {text}");
        assert!(!text.contains("hunter2"), "the password came back: {text}");
    }
}

#[test]
fn scripts_run_as_the_user_asked_for() {
    let cluster = one_agent();
    // Who it runs as, with which groups and home, where, and whether the agent's own
    // environment (the test runner's CARGO_MANIFEST_DIR, here) reached it.
    let script = r#"id -un
[ "$(id -G)" = "$(id -G nobody)" ] && echo groups-ok
[ "$HOME" = "$(getent passwd nobody | cut -d: -f6)" ] && echo home-ok
pwd -P
echo "${CARGO_MANIFEST_DIR:-no-agent-env}""#;
    let (_, command) = put(
        &cluster,
        "whoami",
        &json!({"source": {"script": script}, "runAsUser": "nobody"}),
    );
    let instance = view(&command);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(instance["executionState"], "Succeeded", "{command}");
        let work_dir = std::env::temp_dir()
            .join("fleetrun-run-as")
            .join(instance["executionId"].as_str().expect("id"));
        let expected = format!(
            "nobody\ngroups-ok\nhome-ok\n{}\nno-agent-env\n",
            work_dir.display()
        );
        assert_eq!(instance["output"], expected.as_str(), "{command}");
        assert_eq!(command["properties"]["runAsUser"], "nobody");
        assert!(!work_dir.exists(), "{} is left behind", work_dir.display());
    } else {
        assert_eq!(instance["errorCode"], "RunAsNotPermitted", "{command}");
    }

    let (_, missing) = put(
        &cluster,
        "whoami",
        &json!({"source": {"script": "id -un"}, "runAsUser": "no-such-user-fr"}),
    );
    assert_eq!(view(&missing)["executionState"], "Failed");
    assert_eq!(
        view(&missing)["errorCode"],
        "RunAsUserNotFound",
        "{missing}"
    );
    // The script never started: the deployment failed.
    assert_eq!(missing["properties"]["provisioningState"], "Failed");
}

#[test]
fn interpreters_are_chosen_by_shebang_ps1_and_name() {
    let cluster = one_agent();
    let (_, python) = put(
        &cluster,
        "python",
        &json!({"source": {"script": "#!/usr/bin/env python3\nimport sys\nprint('python', sys.version_info[0])\n"}}),
    );
    assert_eq!(view(&python)["output"], "python 3\n", "{python}");

    let (_, ps1) = put(
        &cluster,
        "ps1",
        &json!({"source": {"script": "#ps1\nWrite-Output 'from pwsh'\n"}}),
    );
    let pwsh_here = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("pwsh").is_file());
    if pwsh_here {
        assert_eq!(view(&ps1)["output"], "from pwsh\n", "{ps1}");
    } else {
        assert_eq!(view(&ps1)["errorCode"], "InterpreterNotFound", "{ps1}");
        assert_eq!(ps1["properties"]["provisioningState"], "Failed");
    }

    // A run names its interpreter explicitly.
    let run = cluster.create_run(json!({
        "targets": {"machines": ["web-1"]},
        "script": "print(6 * 7)",
        "interpreter": "python3"
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    assert_eq!(run["executions"][0]["stdout_tail"], "42\n", "{run}");
}

#[test]
fn bad_bodies_are_refused_by_field_and_change_nothing() {
    let cluster = one_agent();
    let cases = [
        (
            json!({"properties": {"source": {"script": "true"}, "asyncExecuton": true}}),
            "UnknownField",
            "properties.asyncExecuton",
        ),
        (
            json!({"source": {"scrpt": "true"}}),
            "UnknownField",
            "source.scrpt",
        ),
        (
            json!({"location": "x", "sku": "y", "properties": {"source": {"script": "true"}}}),
            "UnknownField",
            "sku",
        ),
        (
            json!({"properties": {"source": {"commandId": "RunShellScript"}}}),
            "CommandNotFound",
            "properties.source.commandId",
        ),
        (
            json!({"source": {"script": "true", "scriptUri": "http://127.0.0.1:9/x"}}),
            "ConflictingScript",
            "source.scriptUri",
        ),
        (json!({"parameters": []}), "MissingSource", "source"),
        (
            json!({"source": {"script": "true"}, "parameters": [{"name": "PATH", "value": "/x"}]}),
            "ReservedParameterName",
            "parameters.PATH",
        ),
        (
            json!({"source": {"script": "true"}, "parameters": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]}),
            "DuplicateParameter",
            "parameters[1].name",
        ),
        (
            json!({"source": {"script": "true"}, "parameters": [{"name": "a", "value": null}]}),
            "InvalidBody",
            "parameters[0].value",
        ),
        (
            json!({"source": {"script": "true"}, "runAsUser": "bad user"}),
            "InvalidRunAsUser",
            "runAsUser",
        ),
        (
            json!({"source": {"script": "true"}, "timeoutInSeconds": -1}),
            "InvalidBody",
            "timeoutInSeconds",
        ),
    ];
    for (body, code, field) in cases {
        let (status, error) = put(&cluster, "bad", &body);
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
        assert_eq!(error["error"]["field"], field, "{body}: {error}");
    }
    // An error about a secret does not quote it.
    for body in [
        json!({"source": {"script": "true"}, "protectedParameters": ["s3cr3t-value"]}),
        json!({"source": {"script": "true"}, "runAsPassword": ["s3cr3t-value"]}),
    ] {
        let (status, error) = put(&cluster, "bad", &body);
        assert_eq!(status, 400, "{error}");
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
    }
    let (status, error) = put(&cluster, "bad name", &json!({"source": {"script": "true"}}));
    assert_eq!(
        (status, error["error"]["code"].clone()),
        (400, json!("InvalidRunCommandName"))
    );
    let (status, _, error) = send(
        &cluster,
        Method::PUT,
        "/v1/machines/nope/run-commands/x",
        Some(&json!({"source": {"script": "true"}})),
    );
    assert_eq!(
        (status, error["error"]["code"].clone()),
        (404, json!("MachineNotFound"))
    );
    let (status, _, error) = send(
        &cluster,
        Method::PATCH,
        &format!("{COMMANDS}/never"),
        Some(&json!({"timeoutInSeconds": 5})),
    );
    assert_eq!(
        (status, error["error"]["code"].clone()),
        (404, json!("RunCommandNotFound"))
    );
    let (status, _, _) = send(&cluster, Method::DELETE, &format!("{COMMANDS}/never"), None);
    assert_eq!(status, 404);

    // Nothing was created, and no run was made.
    let (_, _, list) = send(&cluster, Method::GET, COMMANDS, None);
    assert_eq!(list["value"], json!([]));
    assert_eq!(cluster.run_count(), 0);
}

#[test]
fn the_cli_puts_gets_lists_patches_and_deletes() {
    let cluster = one_agent();
    let put = cluster.fleetrun(&[
        "machine-command",
        "put",
        "web-1",
        "greet",
        "echo hello $who",
        "-p",
        "who=cli",
    ]);
    let text = put.success();
    assert!(
        text.contains("state:         Succeeded (exit code 0)"),
        "{text}"
    );
    assert!(text.contains("hello cli"), "{text}");

    let list = cluster
        .fleetrun(&["machine-command", "list", "web-1"])
        .success();
    assert!(
        list.lines()
            .any(|line| line.trim_start().starts_with("greet") && line.contains("Succeeded")),
        "{list}"
    );

    let patched = cluster
        .fleetrun(&[
            "machine-command",
            "patch",
            "web-1",
            "greet",
            "-p",
            "who=patch",
            "-o",
            "json",
        ])
        .success();
    let patched: Value = serde_json::from_str(&patched).expect("json");
    assert_eq!(view(&patched)["output"], "hello patch\n");

    // A raw Azure body from a file.
    let body = cluster.scratch_dir("cli").join("body.json");
    std::fs::write(
        &body,
        json!({"location": "westeurope", "properties": {"source": {"script": "echo from-body; exit 4"},
            "treatFailureAsDeploymentFailure": true}})
        .to_string(),
    )
    .expect("write body");
    let failed = cluster.fleetrun(&[
        "machine-command",
        "put",
        "web-1",
        "greet",
        "--body",
        body.to_str().expect("path"),
    ]);
    assert_eq!(failed.code, 1, "a failed deployment exits 1");
    assert!(failed.stdout_text().contains("from-body"));

    let get = cluster
        .fleetrun(&["machine-command", "get", "web-1", "greet"])
        .success();
    assert!(get.contains("provisioning:  Failed"), "{get}");

    cluster
        .fleetrun(&["machine-command", "delete", "web-1", "greet"])
        .success();
    let gone = cluster.fleetrun(&["machine-command", "get", "web-1", "greet"]);
    assert_eq!(gone.code, 1);
    assert!(
        gone.stderr.contains("no run command named `greet`"),
        "{}",
        gone.stderr
    );
}

/// PUTs of one name at once: each cancels what ran before it, so in the end exactly one
/// script of the name runs, the one the name points at.
#[test]
fn concurrent_puts_of_one_name_leave_one_script_running() {
    let cluster = one_agent();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let puts: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    put(
                        &cluster,
                        "race",
                        &json!({"source": {"script": "sleep 300"}, "asyncExecution": true}),
                    )
                    .0
                })
            })
            .collect();
        puts.into_iter()
            .map(|put| put.join().expect("a PUT thread"))
            .collect()
    });
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![200, 200, 200, 201],
        "one creates, the rest replace"
    );

    let latest = get(&cluster, "race").1;
    let latest_run = view(&latest)["runId"].as_str().expect("run id").to_string();
    let runs = cluster.get_json("/v1/runs")["runs"].clone();
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 4, "{runs:?}");
    for run in runs {
        let id = run["id"].as_str().expect("id");
        if id != latest_run {
            let run = cluster.wait_run(id);
            assert_eq!(run["status"], "canceled", "{run}");
        }
    }
    let running = wait_command_state(&cluster, "race", "running");
    assert_eq!(view(&running)["runId"], latest_run.as_str());

    let (status, _, _) = send(&cluster, Method::DELETE, &format!("{COMMANDS}/race"), None);
    assert_eq!(status, 204);
    let run = cluster.wait_run(&latest_run);
    assert_eq!(run["status"], "canceled", "{run}");
}
