//! Requests the server must refuse: each with its status, a stable error code and the field at
//! fault, and without creating anything.

use serde_json::{Value, json};

use crate::harness::{Cluster, run_cli};

/// POSTs `body` to /v1/runs and checks the refusal, and that no run was created.
fn check(cluster: &Cluster, body: Value, status: u16, code: &str, field: &str) -> String {
    let runs_before = cluster.run_count();
    let (got_status, answer) = cluster.post_json("/v1/runs", &body);
    let error = &answer["error"];
    assert_eq!(
        (got_status, error["code"].as_str(), error["field"].as_str()),
        (status, Some(code), Some(field)),
        "for {body}: {answer}"
    );
    let message = error["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "no message for {body}: {answer}");
    assert_eq!(
        cluster.run_count(),
        runs_before,
        "a run was created for {body}"
    );
    message.to_string()
}

#[test]
fn bad_run_requests_are_refused_with_a_code_and_a_field() {
    let mut cluster = Cluster::start_with(&["--max-script-bytes", "1KiB"]);
    cluster.agent("web-1", "env=prod");
    let all = json!({"all": true});

    check(
        &cluster,
        json!({"targets": all, "script": "  \n"}),
        400,
        "EmptyScript",
        "script",
    );
    let large = format!("echo {}", "x".repeat(1100));
    check(
        &cluster,
        json!({"targets": all, "script": large}),
        400,
        "ScriptTooLarge",
        "script",
    );
    check(
        &cluster,
        json!({"targets": {"machines": ["nope"]}, "script": "true"}),
        404,
        "MachineNotFound",
        "targets.machines[0]",
    );
    let message = check(
        &cluster,
        json!({"targets": {"selector": "env=dev"}, "script": "true"}),
        422,
        "NoMatchingMachines",
        "targets.selector",
    );
    assert!(message.contains("env=dev"), "{message}");
    check(
        &cluster,
        json!({"targets": {"selector": "env=prod,,"}, "script": "true"}),
        400,
        "InvalidSelector",
        "targets.selector",
    );
    check(
        &cluster,
        json!({"targets": all, "script": "true", "timeout": "soon"}),
        400,
        "InvalidDuration",
        "timeout",
    );
    check(
        &cluster,
        json!({"targets": all, "script": "echo {{who}}"}),
        400,
        "MissingParameter",
        "parameters.who",
    );
    check(
        &cluster,
        json!({"targets": all, "script": "true", "parameters": {"no spaces": "x"}}),
        400,
        "InvalidParameterName",
        "parameters",
    );
    let message = check(
        &cluster,
        json!({"targets": all, "script": "true", "colour": "red"}),
        400,
        "InvalidBody",
        "colour",
    );
    assert!(message.contains("colour"), "{message}");
    check(
        &cluster,
        json!({"targets": {}, "script": "true"}),
        400,
        "NoTargets",
        "targets",
    );
    check(
        &cluster,
        json!({"targets": {"all": true, "machines": ["web-1"]}, "script": "true"}),
        400,
        "ConflictingTargets",
        "targets",
    );
    // A refused secret is not quoted back.
    let message = check(
        &cluster,
        json!({"targets": all, "script": "true", "protected_parameters": {"token": ["s3cr3t"]}}),
        400,
        "InvalidBody",
        "protected_parameters.token",
    );
    assert!(!message.contains("s3cr3t"), "{message}");
    check(
        &cluster,
        json!({"targets": all, "script": "true", "run_as_user": "two words"}),
        400,
        "InvalidRunAsUser",
        "run_as_user",
    );

    assert_eq!(cluster.run_count(), 0);
}

#[test]
fn the_api_needs_the_admin_token_but_health_does_not() {
    let cluster = Cluster::start();
    let status_with = |method: reqwest::Method, path: &str, token: Option<&str>| {
        let response = cluster
            .request(method, path, token)
            .send()
            .expect("request");
        let status = response.status().as_u16();
        let body: Value = response.json().unwrap_or(Value::Null);
        (status, body)
    };

    let (status, body) = status_with(reqwest::Method::GET, "/v1/machines", None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "Unauthorized", "{body}");
    let (status, body) = status_with(reqwest::Method::GET, "/v1/machines", Some("wrong-token"));
    assert_eq!(status, 401, "{body}");
    // The enrollment token enrolls machines; it is not an operator's token.
    let (status, body) = status_with(
        reqwest::Method::GET,
        "/v1/machines",
        Some(&cluster.enroll_token),
    );
    assert_eq!(status, 401, "{body}");
    let (status, body) = status_with(reqwest::Method::POST, "/v1/runs", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = status_with(reqwest::Method::GET, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    let (status, body) = status_with(reqwest::Method::GET, "/v1/machines", Some(&cluster.token));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_cli_fails_with_the_servers_message() {
    let mut cluster = Cluster::start();
    cluster.agent("web-1", "env=prod");

    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "-m", "nope", "true"],
            "no machine is named or has the id `nope`",
        ),
        (&["run", "-m", "nope", "true"], "MachineNotFound"),
        (&["run", "--all", "   "], "EmptyScript"),
        (
            &["run", "--all", "--timeout", "soon", "true"],
            "InvalidDuration",
        ),
        (&["run", "--all", "echo {{who}}"], "parameters.who"),
    ];
    for (args, expected) in cases {
        let output = cluster.fleetrun(args);
        assert_ne!(output.code, 0, "fleetrun {args:?} succeeded");
        assert!(
            output.stderr.contains(expected),
            "fleetrun {args:?}: stderr {:?} lacks {expected:?}",
            output.stderr
        );
    }
    let missing = cluster.fleetrun(&["runs", "show", "0190aaaa-0000-7000-8000-000000000000"]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("RunNotFound"),
        "stderr: {}",
        missing.stderr
    );

    let no_token = run_cli(
        &["machines", "list"],
        &[("FLEETRUN_URL", &cluster.url)],
        None,
    );
    assert_ne!(no_token.code, 0);
    assert!(
        no_token.stderr.contains("no API token"),
        "stderr: {}",
        no_token.stderr
    );
    let wrong_token = run_cli(
        &["machines", "list"],
        &[("FLEETRUN_URL", &cluster.url), ("FLEETRUN_TOKEN", "wrong")],
        None,
    );
    assert_ne!(wrong_token.code, 0);
    assert!(
        wrong_token.stderr.contains("Unauthorized"),
        "stderr: {}",
        wrong_token.stderr
    );
    assert_eq!(cluster.run_count(), 0);
}
