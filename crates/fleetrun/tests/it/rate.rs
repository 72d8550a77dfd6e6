//! Rate control across a run (`--max-concurrency`, `--max-errors`) and the run's event stream.

use std::io::{BufRead, BufReader};

use serde_json::{Value, json};

use crate::harness::Cluster;

fn agents(cluster: &mut Cluster, count: usize) {
    for index in 0..count {
        cluster.agent(&format!("node-{index}"), "pool=rate");
    }
}

#[test]
fn max_concurrency_is_never_exceeded_across_machines() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 5);
    let shared = cluster.scratch_dir("shared");
    let shared_text = shared.to_str().expect("UTF-8 path");
    // Every execution records how many were running when it started; all share one directory.
    let script = "touch running.$FLEETRUN_EXECUTION_ID; ls running.* | wc -l >> counts; sleep 0.5; \
                  rm running.$FLEETRUN_EXECUTION_ID";
    let output = cluster.fleetrun(&[
        "run",
        "--select",
        "pool=rate",
        "--max-concurrency",
        "2",
        "--workdir",
        shared_text,
        script,
    ]);
    output.success();
    let run = cluster.get_json(&format!("/v1/runs/{}", cluster.newest_run_id()));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["max_concurrency"], "2", "{run}");
    let counts: Vec<u32> = std::fs::read_to_string(shared.join("counts"))
        .expect("counts")
        .lines()
        .map(|line| line.trim().parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), 5, "{counts:?}");
    assert!(
        counts.iter().all(|count| (1..=2).contains(count)),
        "more than 2 at once: {counts:?}"
    );
    assert!(
        counts.contains(&2),
        "the window was never used in full: {counts:?}"
    );
}

#[test]
fn max_errors_skips_the_rest_and_says_why() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 5);
    // One at a time, one failure allowed: the second failure stops the run.
    let output = cluster.fleetrun(&[
        "run",
        "--select",
        "pool=rate",
        "--max-concurrency",
        "1",
        "--max-errors",
        "1",
        "exit 7",
    ]);
    assert_ne!(output.code, 0, "a failed run exits non-zero");
    let printed = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        printed.contains("max_errors"),
        "the CLI says why it stopped:\n{printed}"
    );

    let run = cluster.get_json(&format!("/v1/runs/{}", cluster.newest_run_id()));
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["counts"]["failed"], 2, "{run}");
    assert_eq!(run["counts"]["skipped"], 3, "{run}");
    let reason = run["stop_reason"].as_str().expect("a stop reason");
    assert!(reason.contains("max_errors"), "{reason}");
    for execution in run["executions"].as_array().expect("executions") {
        if execution["state"] == "skipped" {
            assert!(
                execution["started_at"].is_null(),
                "a skipped execution never ran: {execution}"
            );
        }
    }
}

#[test]
fn percentages_and_bad_limits() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 2);
    let run = cluster.create_run(json!({
        "targets": {"selector": "pool=rate"},
        "script": "true",
        "max_concurrency": "50%",
        "max_errors": 0
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        (run["max_concurrency"].as_str(), run["max_errors"].as_str()),
        (Some("50%"), Some("0"))
    );

    let before = cluster.run_count();
    for (body, field) in [
        (
            json!({"targets": {"all": true}, "script": "true", "max_concurrency": 0}),
            "max_concurrency",
        ),
        (
            json!({"targets": {"all": true}, "script": "true", "max_concurrency": "150%"}),
            "max_concurrency",
        ),
        (
            json!({"targets": {"all": true}, "script": "true", "max_errors": "many"}),
            "max_errors",
        ),
    ] {
        let (status, error) = cluster.post_json("/v1/runs", &body);
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    assert_eq!(
        cluster.run_count(),
        before,
        "a rejected run creates nothing"
    );
}

#[test]
fn the_event_stream_tells_every_change_and_ends_with_done() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 3);
    let run = cluster.create_run(json!({
        "targets": {"selector": "pool=rate"},
        "script": "sleep 0.2",
        "max_concurrency": 1
    }));
    let id = run["id"].as_str().expect("id");
    let response = cluster
        .request(
            reqwest::Method::GET,
            &format!("/v1/runs/{id}/events"),
            Some(&cluster.token),
        )
        .send()
        .expect("GET events");
    assert_eq!(response.status().as_u16(), 200);
    let mut events: Vec<(String, Value)> = Vec::new();
    let mut name = String::new();
    // The stream ends by itself after `done`; the harness's client times out if it does not.
    for line in BufReader::new(response).lines().take(10_000) {
        let line = line.expect("a line of the event stream");
        if let Some(value) = line.strip_prefix("event: ") {
            name = value.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            events.push((name.clone(), serde_json::from_str(data).expect("JSON data")));
        }
    }
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"run"), "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let (_, done) = events.last().expect("done");
    assert_eq!(done["status"], "succeeded", "{done}");
    // Each of the three executions is seen ending, from running.
    let ended: Vec<&Value> = events
        .iter()
        .filter(|(name, event)| name == "execution" && event["state"] == "succeeded")
        .map(|(_, event)| event)
        .collect();
    assert_eq!(ended.len(), 3, "{events:?}");
    assert!(
        ended
            .iter()
            .all(|event| event["previous_state"] == "running"),
        "{ended:?}"
    );
}

#[test]
fn waiting_on_a_pipe_prints_no_progress() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 2);
    let output = cluster.fleetrun(&["run", "--select", "pool=rate", "echo hi"]);
    let printed = output.success();
    assert!(
        !printed.contains('\r') && !printed.contains('█'),
        "{printed:?}"
    );
    assert_eq!(printed.matches("hi\n").count(), 2, "{printed}");
    assert!(
        printed.contains("2 succeeded"),
        "a summary at the end: {printed}"
    );
    let stderr = &output.stderr;
    assert!(
        !stderr.contains("done"),
        "no progress bar on stderr either: {stderr}"
    );
}

#[test]
fn a_deleted_target_fails_alone_and_the_run_goes_ahead() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 2);
    cluster.kill_agent("node-1");
    cluster
        .fleetrun(&["machines", "delete", "node-1"])
        .success();
    let run = cluster.create_run(json!({
        "targets": {"machines": ["node-0", "node-1"]},
        "script": "echo fine"
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    assert_eq!(run["status"], "failed", "{run}");
    let executions = run["executions"].as_array().expect("executions");
    let by_name = |name: &str| {
        executions
            .iter()
            .find(|execution| execution["machine_name"] == name)
            .unwrap_or_else(|| panic!("no execution on {name}: {run}"))
    };
    assert_eq!(by_name("node-0")["state"], "succeeded", "{run}");
    let deleted = by_name("node-1");
    assert_eq!(deleted["state"], "failed", "{deleted}");
    assert!(
        deleted["message"]
            .as_str()
            .unwrap_or("")
            .contains("deleted"),
        "{deleted}"
    );
    assert!(deleted["started_at"].is_null(), "{deleted}");
    // The name is free again, and an unknown name is still an error before anything runs.
    let (status, error) = cluster.post_json(
        "/v1/runs",
        &json!({"targets": {"machines": ["node-0", "never-was"]}, "script": "true"}),
    );
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["field"], "targets.machines[1]", "{error}");
}

#[test]
fn an_execution_released_late_still_meets_its_delivery_timeout() {
    let mut cluster = Cluster::start();
    agents(&mut cluster, 2);
    cluster.kill_agent("node-1");
    cluster.wait_machine_status("node-1", "offline");
    // One at a time: node-0 runs longer than the delivery timeout, and only then is node-1's
    // execution released, with a deadline of its own that must still be kept.
    let run = cluster.create_run(json!({
        "targets": {"machines": ["node-0", "node-1"]},
        "script": "sleep 1.5",
        "max_concurrency": 1,
        "delivery_timeout": "1s"
    }));
    let run = cluster.wait_run(run["id"].as_str().expect("id"));
    let states: Vec<(&str, &str)> = run["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|e| {
            (
                e["machine_name"].as_str().unwrap_or(""),
                e["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![("node-0", "succeeded"), ("node-1", "delivery_timed_out")],
        "{run}"
    );
}
