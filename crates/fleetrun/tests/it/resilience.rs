//! Stopping scripts (timeouts, cancel), machines that are offline, and servers and agents
//! that die or restart in the middle of a run.

use std::path::Path;
use std::time::Duration;

use crate::harness::{Cluster, group_alive, process_alive, read_pid, wait_until};

/// Records its process group and a background child in `workdir`, then waits for long.
const LONG_SCRIPT: &str = "echo $$ > group.pid; sleep 300 & echo $! > bg.pid; sleep 300";

/// The script's process group and background pid, once it has written them.
fn script_pids(cluster: &Cluster, workdir: &Path) -> (i32, i32) {
    let group = read_pid(&workdir.join("group.pid"));
    let background = read_pid(&workdir.join("bg.pid"));
    cluster.kill_group_on_drop(group);
    (group, background)
}

fn wait_until_gone(group: i32, background: i32) {
    wait_until(
        Duration::from_secs(10),
        "the background sleep is gone",
        || !process_alive(background),
    );
    wait_until(
        Duration::from_secs(10),
        "every process of the script's group is gone",
        || !group_alive(group),
    );
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let workdir = cluster.scratch_dir("timeout");
    let workdir_text = workdir.to_str().expect("UTF-8 path");

    let output = cluster.fleetrun(&[
        "run",
        "-m",
        "web-1",
        "--timeout",
        "1s",
        "--workdir",
        workdir_text,
        LONG_SCRIPT,
    ]);
    assert_eq!(
        output.code, 124,
        "a timed out script exits 124; stderr: {}",
        output.stderr
    );
    let (group, background) = script_pids(&cluster, &workdir);
    let execution = cluster.execution(&cluster.newest_run_id(), "web-1");
    assert_eq!(execution["state"], "timed_out", "{execution}");
    wait_until_gone(group, background);
}

#[test]
fn cancel_stops_a_running_script_and_its_children() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let (id, group, background) = start_long_script(&cluster, "cancel");

    let canceled = cluster.fleetrun(&["runs", "cancel", &id]).success();
    assert!(canceled.contains(&id), "{canceled}");
    cluster.wait_execution_state(&id, "web-1", "canceled", Duration::from_secs(10));
    assert_eq!(cluster.wait_run(&id)["status"], "canceled");
    wait_until_gone(group, background);
}

#[test]
fn a_run_for_an_offline_machine_is_delivered_when_it_connects() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let machine_id = cluster.machine("web-1").expect("enrolled")["id"].clone();
    cluster.stop_agent("web-1");

    let id = cluster
        .fleetrun(&["run", "--no-wait", "-m", "web-1", "echo late"])
        .success()
        .trim()
        .to_string();
    let execution = cluster.execution(&id, "web-1");
    assert_eq!(execution["state"], "pending", "{execution}");

    // The same state directory: the agent uses its saved credential, it does not enroll again.
    cluster.start_agent("web-1");
    let run = cluster.wait_run(&id);
    let execution = &run["executions"][0];
    assert_eq!(execution["state"], "succeeded", "{run}");
    assert_eq!(
        cluster.output(execution["id"].as_str().expect("id"), "stdout"),
        b"late\n"
    );
    let output = cluster.fleetrun(&["runs", "output", &id]);
    assert_eq!(output.success(), "late\n");

    let machines = cluster.get_json("/v1/machines");
    let machines = machines["machines"].as_array().expect("machines");
    assert_eq!(machines.len(), 1, "{machines:?}");
    assert_eq!(machines[0]["id"], machine_id, "the agent enrolled again");
}

#[test]
fn a_machine_that_stays_offline_times_out_delivery() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    cluster.stop_agent("web-1");

    let output = cluster.fleetrun(&["run", "-m", "web-1", "--delivery-timeout", "1s", "true"]);
    assert_ne!(output.code, 0, "an undelivered run must fail");
    assert!(
        output.stderr.contains("delivery_timed_out"),
        "stderr: {}",
        output.stderr
    );
    let id = cluster.newest_run_id();
    let execution = cluster.execution(&id, "web-1");
    assert_eq!(execution["state"], "delivery_timed_out", "{execution}");

    // Coming back later does not revive it.
    cluster.start_agent("web-1");
    let fresh = cluster.fleetrun(&["run", "-m", "web-1", "echo back"]);
    assert_eq!(fresh.success(), "back\n");
    let execution = cluster.execution(&id, "web-1");
    assert_eq!(execution["state"], "delivery_timed_out", "{execution}");
}

#[test]
fn a_run_survives_a_server_crash_without_losing_or_repeating_output() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let earlier = cluster
        .fleetrun(&["run", "--no-wait", "-m", "web-1", "echo earlier"])
        .success()
        .trim()
        .to_string();
    assert_eq!(cluster.wait_run(&earlier)["status"], "succeeded");

    let id = cluster
        .fleetrun(&[
            "run",
            "--no-wait",
            "-m",
            "web-1",
            "echo before; sleep 2; echo after",
        ])
        .success()
        .trim()
        .to_string();
    let execution_id = cluster.execution(&id, "web-1")["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Crash once the first line is stored, so that resending it would show as a duplicate.
    wait_until(Duration::from_secs(10), "the first line is stored", || {
        cluster.output(&execution_id, "stdout") == b"before\n"
    });
    cluster.restart_server(true);

    let run = cluster.wait_run(&id);
    let execution = &run["executions"][0];
    assert_eq!(execution["state"], "succeeded", "{run}");
    assert_eq!(
        String::from_utf8_lossy(&cluster.output(&execution_id, "stdout")),
        "before\nafter\n"
    );
    assert_eq!(execution["stdout_bytes"], 13, "{execution}");

    let earlier_run = cluster.get_json(&format!("/v1/runs/{earlier}"));
    assert_eq!(earlier_run["status"], "succeeded", "{earlier_run}");
    let output = cluster.fleetrun(&["runs", "output", &earlier]);
    assert_eq!(output.success(), "earlier\n");
}

#[test]
fn an_agent_reconnects_by_itself_after_a_graceful_server_restart() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    cluster.stop_server(false);
    cluster.start_server_again();
    cluster.wait_machine_status("web-1", "online");
    cluster.assert_agent_running("web-1");
    let output = cluster.fleetrun(&["run", "-m", "web-1", "echo again"]);
    assert_eq!(output.success(), "again\n");
}

#[test]
fn a_script_orphaned_by_an_agent_crash_is_stopped_and_reported_interrupted() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let (id, group, background) = start_long_script(&cluster, "orphan");

    cluster.stop_agent("web-1");
    cluster.start_agent("web-1");
    let execution =
        cluster.wait_execution_state(&id, "web-1", "interrupted", Duration::from_secs(15));
    assert!(
        execution["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty()),
        "an interrupted execution says why: {execution}"
    );
    wait_until_gone(group, background);
}

/// Starts `LONG_SCRIPT` on web-1 without waiting, in a fresh working directory named `dir`,
/// and waits until it runs: its run id, process group and background process.
fn start_long_script(cluster: &Cluster, dir: &str) -> (String, i32, i32) {
    let workdir = cluster.scratch_dir(dir);
    let workdir_text = workdir.to_str().expect("UTF-8 path");
    let id = cluster
        .fleetrun(&[
            "run",
            "--no-wait",
            "-m",
            "web-1",
            "--workdir",
            workdir_text,
            LONG_SCRIPT,
        ])
        .success()
        .trim()
        .to_string();
    cluster.wait_execution_state(&id, "web-1", "running", Duration::from_secs(10));
    let (group, background) = script_pids(cluster, &workdir);
    assert!(
        group_alive(group) && process_alive(background),
        "the script is running"
    );
    (id, group, background)
}
