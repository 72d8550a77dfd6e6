//! Running scripts: what the operator sees (exit codes, output, per-machine results), targets,
//! parameters, concurrency and output limits.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::harness::Cluster;

/// The sections of `fleetrun run` over many machines: each `== name (state...)` header with the
/// lines under it, and the final summary line.
fn sections(stdout: &str) -> (BTreeMap<String, (String, Vec<String>)>, String) {
    let mut sections: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut summary = String::new();
    for line in stdout.lines() {
        if let Some(header) = line.strip_prefix("== ") {
            let name = header.split(' ').next().unwrap_or_default().to_string();
            sections.insert(name.clone(), (header.to_string(), Vec::new()));
            current = Some(name);
        } else if line.starts_with("run ") {
            summary = line.to_string();
            current = None;
        } else if let Some(name) = &current {
            sections
                .get_mut(name)
                .expect("section")
                .1
                .push(line.to_string());
        }
    }
    (sections, summary)
}

#[test]
fn a_single_target_behaves_like_ssh() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "env=prod,role=web");

    let output = cluster.fleetrun(&[
        "run",
        "--machine",
        "web-1",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(output.code, 3, "exit code; stderr: {}", output.stderr);
    assert_eq!(output.stdout_text(), "out\n");
    assert!(
        output.stderr.contains("err\n"),
        "stderr: {:?}",
        output.stderr
    );
    assert!(
        !output.stderr.contains("out"),
        "stdout leaked into stderr: {:?}",
        output.stderr
    );

    let from_stdin = cluster.fleetrun_stdin(&["run", "-m", "web-1", "-"], b"echo from stdin\n");
    assert_eq!(from_stdin.success(), "from stdin\n");
}

#[test]
fn many_targets_are_reported_per_machine() {
    let mut cluster = Cluster::start();
    cluster.agent("good-1", "role=web");
    cluster.agent("bad-1", "role=web");

    let all_fine = cluster.fleetrun(&["run", "--all", "echo hi"]).success();
    let (found, summary) = sections(&all_fine);
    assert_eq!(found.len(), 2, "{all_fine}");
    for name in ["good-1", "bad-1"] {
        let (header, lines) = &found[name];
        assert_eq!(header, &format!("{name} (succeeded, exit 0)"), "{all_fine}");
        assert_eq!(lines, &["hi"], "{all_fine}");
    }
    assert!(summary.ends_with(": succeeded (2 succeeded)"), "{all_fine}");

    // The default working directory is under the agent's state directory, which names it.
    let script = r#"case "$PWD" in */agents/bad-1/*) echo failing; exit 5;; esac; echo fine"#;
    let one_fails = cluster.fleetrun(&["run", "--all", script]);
    assert_ne!(
        one_fails.code,
        0,
        "one machine failed: {}",
        one_fails.stdout_text()
    );
    let text = one_fails.stdout_text();
    let (found, summary) = sections(&text);
    assert_eq!(
        found["bad-1"],
        (
            "bad-1 (failed, exit 5)".to_string(),
            vec!["failing".to_string()]
        ),
        "{text}"
    );
    assert_eq!(
        found["good-1"],
        (
            "good-1 (succeeded, exit 0)".to_string(),
            vec!["fine".to_string()]
        ),
        "{text}"
    );
    assert!(summary.contains(": failed ("), "{text}");

    let as_json = cluster.fleetrun(&["run", "-o", "json", "--all", script]);
    assert_ne!(as_json.code, 0);
    let run: Value = serde_json::from_slice(&as_json.stdout)
        .unwrap_or_else(|error| panic!("-o json is not JSON ({error}): {}", as_json.stdout_text()));
    assert_eq!(run["status"], "failed", "{run}");
    let mut results: Vec<(String, String, Value)> = run["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|e| {
            (
                e["machine_name"].as_str().expect("name").to_string(),
                e["state"].as_str().expect("state").to_string(),
                e["exit_code"].clone(),
            )
        })
        .collect();
    results.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        results,
        vec![
            ("bad-1".to_string(), "failed".to_string(), json!(5)),
            ("good-1".to_string(), "succeeded".to_string(), json!(0)),
        ]
    );
}

#[test]
fn selectors_pick_machines_by_label() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "env=prod,role=web");
    cluster.agent("dev-1", "env=dev");

    let output = cluster.fleetrun(&["run", "--select", "env=prod", "echo selected"]);
    assert_eq!(output.success(), "selected\n");
    let run = cluster.get_json(&format!("/v1/runs/{}", cluster.newest_run_id()));
    let names: Vec<&str> = run["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|e| e["machine_name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["web-1"], "{run}");

    let not_prod =
        cluster.create_run(json!({"targets": {"selector": "env!=prod"}, "script": "true"}));
    let names: Vec<&str> = not_prod["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|e| e["machine_name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["dev-1"], "{not_prod}");

    let runs_before = cluster.run_count();
    let nothing = cluster.fleetrun(&["run", "--select", "env=prod,role=db", "echo never"]);
    assert_ne!(nothing.code, 0, "a selector matching nothing must fail");
    assert!(
        nothing.stderr.contains("no machine matches"),
        "stderr: {}",
        nothing.stderr
    );
    assert_eq!(cluster.run_count(), runs_before, "no run may be created");
}

#[test]
fn binary_output_is_kept_byte_for_byte() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    let script = r"printf '\377\000\001\200end'; printf '\000err\377' >&2";
    let stdout: &[u8] = b"\xff\x00\x01\x80end";
    let stderr: &[u8] = b"\x00err\xff";

    let live = cluster.fleetrun(&["run", "-m", "web-1", script]);
    assert_eq!(live.code, 0, "stderr: {}", live.stderr);
    assert_eq!(live.stdout, stdout);

    let id = cluster
        .fleetrun(&["run", "--no-wait", "-m", "web-1", script])
        .success()
        .trim()
        .to_string();
    let run = cluster.wait_run(&id);
    assert_eq!(run["status"], "succeeded", "{run}");
    let execution = &run["executions"][0];
    assert_eq!(execution["stdout_bytes"], stdout.len(), "{execution}");
    assert_eq!(execution["stderr_bytes"], stderr.len(), "{execution}");
    let output = cluster.fleetrun(&["runs", "output", &id, "--machine", "web-1"]);
    assert_eq!(output.code, 0, "{}", output.stderr);
    assert_eq!(output.stdout, stdout);
    let output = cluster.fleetrun(&["runs", "output", &id, "--machine", "web-1", "--stderr"]);
    assert_eq!(output.code, 0, "{}", output.stderr);
    assert_eq!(output.stdout, stderr);
    let execution_id = execution["id"].as_str().expect("id");
    assert_eq!(cluster.output(execution_id, "stdout"), stdout);
    assert_eq!(cluster.output(execution_id, "stderr"), stderr);
}

#[test]
fn parameters_environment_and_working_directory_reach_the_script() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");

    let output = cluster.fleetrun(&[
        "run",
        "-m",
        "web-1",
        "--param",
        "who=world",
        "echo {{who}} $who",
    ]);
    assert_eq!(output.success(), "world world\n");

    let output = cluster.fleetrun(&[
        "run",
        "-m",
        "web-1",
        "--env",
        "GREETING=hi",
        "echo $GREETING",
    ]);
    assert_eq!(output.success(), "hi\n");

    let workdir = cluster.scratch_dir("here");
    let workdir = workdir.to_str().expect("UTF-8 path");
    let output = cluster.fleetrun(&["run", "-m", "web-1", "--workdir", workdir, "pwd"]);
    assert_eq!(output.success(), format!("{workdir}\n"));
}

#[test]
fn an_agent_runs_at_most_max_parallel_scripts_at_once() {
    let mut cluster = Cluster::start();
    cluster.agent_with("web-1", "", &["--max-parallel", "2"]);
    let workdir = cluster.scratch_dir("shared");
    let workdir_text = workdir.to_str().expect("UTF-8 path");
    let script = "touch running.$FLEETRUN_EXECUTION_ID; ls running.* | wc -l >> counts; sleep 1; \
                  rm running.$FLEETRUN_EXECUTION_ID";

    let ids: Vec<String> = (0..5)
        .map(|_| {
            let output = cluster.fleetrun(&[
                "run",
                "--no-wait",
                "-m",
                "web-1",
                "--workdir",
                workdir_text,
                script,
            ]);
            output.success().trim().to_string()
        })
        .collect();
    for id in &ids {
        let run = cluster.wait_run(id);
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let counts = std::fs::read_to_string(workdir.join("counts")).expect("counts");
    let counts: Vec<u32> = counts
        .lines()
        .map(|line| line.trim().parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), 5, "{counts:?}");
    assert!(
        counts.iter().all(|count| (1..=2).contains(count)),
        "more than 2 ran at once: {counts:?}"
    );
}

#[test]
fn output_over_the_cap_is_dropped_and_counted() {
    let mut cluster = Cluster::start_with(&["--output-cap", "1KiB"]);
    cluster.agent("web-1", "");
    let id = cluster
        .fleetrun(&["run", "--no-wait", "-m", "web-1", "head -c 5000 /dev/zero"])
        .success()
        .trim()
        .to_string();
    let run = cluster.wait_run(&id);
    let execution = &run["executions"][0];
    assert_eq!(execution["state"], "succeeded", "{execution}");
    assert_eq!(execution["stdout_bytes"], 1024, "{execution}");
    assert_eq!(execution["stdout_dropped"], 3976, "{execution}");
    let stored = cluster.output(execution["id"].as_str().expect("id"), "stdout");
    assert_eq!(stored, vec![0u8; 1024]);
}

#[test]
fn an_execution_shows_the_last_4_kib_of_its_output_inline() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    // 2000 lines of 5 bytes: 10000 bytes, every line different.
    let id = cluster
        .fleetrun(&["run", "--no-wait", "-m", "web-1", "seq -w 0 1999"])
        .success()
        .trim()
        .to_string();
    let run = cluster.wait_run(&id);
    let execution = &run["executions"][0];
    assert_eq!(execution["state"], "succeeded", "{execution}");
    let expected: String = (0..2000).map(|n| format!("{n:04}\n")).collect();
    assert_eq!(execution["stdout_bytes"], 10000, "{execution}");
    assert_eq!(execution["stdout_dropped"], 0, "{execution}");
    let tail = execution["stdout_tail"].as_str().expect("tail");
    assert_eq!(tail.len(), 4096);
    assert_eq!(tail, &expected[expected.len() - 4096..]);
}

#[test]
fn output_that_outgrows_the_inline_tail_is_kept_whole_and_in_order() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "");
    // Small output is held in memory until it outgrows the 4 KiB tail; then it moves to a
    // file. Followed live and read afterwards, the bytes must be the same, in order.
    let script = "head -c 3000 /dev/zero | tr '\\0' a; sleep 0.3; head -c 3000 /dev/zero | tr '\\0' b; \
                  sleep 0.3; printf end";
    let output = cluster.fleetrun(&["run", "-m", "web-1", script]);
    let expected = format!("{}{}end", "a".repeat(3000), "b".repeat(3000));
    assert_eq!(output.success(), expected, "followed live");
    let id = cluster.newest_run_id();
    let stored = cluster.fleetrun(&["runs", "output", &id, "-m", "web-1"]);
    assert_eq!(stored.success(), expected, "read back");
    let execution = cluster.execution(&id, "web-1");
    assert_eq!(execution["stdout_bytes"], 6003, "{execution}");
}
