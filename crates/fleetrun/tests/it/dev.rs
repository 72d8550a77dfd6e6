//! `fleetrun dev`: a server and one local agent in one process, ready to use, that keeps
//! everything across a restart on the same data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    Output, Process, file_identity, fresh_env_file, http_client, run_cli, wait_until,
};

/// A running `fleetrun dev`, with the values of its `dev.env`; prints its log if a test fails.
struct Dev {
    process: Option<Process>,
    log: PathBuf,
    env: BTreeMap<String, String>,
}

impl Dev {
    fn start(data_dir: &Path, log: &Path) -> Self {
        let env_file = data_dir.join("dev.env");
        let previous = file_identity(&env_file);
        let args: Vec<String> = [
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--kill-grace",
            "1s",
            "--data-dir",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .chain([data_dir.display().to_string()])
        .collect();
        let mut dev = Self {
            process: Some(Process::spawn(&args, log, None)),
            log: log.to_path_buf(),
            env: BTreeMap::new(),
        };
        let mut env = None;
        wait_until(
            Duration::from_secs(20),
            "fleetrun dev writes dev.env",
            || {
                dev.process
                    .as_mut()
                    .expect("running")
                    .assert_running("fleetrun dev");
                env = fresh_env_file(&env_file, previous);
                env.is_some()
            },
        );
        dev.env = env.expect("dev.env");
        dev
    }

    fn url(&self) -> &str {
        &self.env["FLEETRUN_URL"]
    }

    fn fleetrun(&self, args: &[&str]) -> Output {
        let env = [
            ("FLEETRUN_URL", self.url()),
            ("FLEETRUN_TOKEN", self.env["FLEETRUN_TOKEN"].as_str()),
        ];
        run_cli(args, &env, None)
    }

    /// The machines, through the REST API.
    fn machines(&self) -> Vec<Value> {
        let response = http_client()
            .get(format!("{}/v1/machines", self.url()))
            .bearer_auth(&self.env["FLEETRUN_TOKEN"])
            .send()
            .expect("GET /v1/machines");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().expect("JSON");
        body["machines"].as_array().expect("machines").clone()
    }

    fn wait_for_one_online_machine(&self) {
        wait_until(Duration::from_secs(20), "the local agent is online", || {
            let machines = self.machines();
            machines.len() == 1 && machines[0]["status"] == "online"
        });
    }

    fn interrupt(&mut self) -> std::process::ExitStatus {
        let process = self.process.take().expect("running");
        process.stop_with(
            nix::sys::signal::Signal::SIGINT,
            "fleetrun dev after SIGINT",
        )
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        drop(self.process.take());
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- {} -----\n{log}", self.log.display());
        }
    }
}

#[test]
fn dev_runs_a_server_and_an_agent_and_keeps_everything_across_restarts() {
    let dir = tempfile::Builder::new()
        .prefix("fleetrun-dev-")
        .tempdir()
        .expect("temp dir");
    let data_dir = dir.path().join("data");
    let log = dir.path().join("dev.log");

    let mut dev = Dev::start(&data_dir, &log);
    let banner_line = format!("export FLEETRUN_URL={}", dev.url());
    wait_until(
        Duration::from_secs(10),
        "the banner shows the export lines",
        || std::fs::read_to_string(&log).is_ok_and(|text| text.contains(&banner_line)),
    );
    dev.wait_for_one_online_machine();
    let table = dev.fleetrun(&["machines", "list"]).success();
    assert!(table.contains("online"), "{table}");

    let output = dev.fleetrun(&["run", "--all", "echo hi"]);
    assert_eq!(output.success(), "hi\n");
    let runs: Value =
        serde_json::from_str(&dev.fleetrun(&["runs", "list", "-o", "json"]).success())
            .expect("JSON");
    let run_id = runs["runs"][0]["id"].as_str().expect("a run").to_string();
    let machine_id = dev.machines()[0]["id"].clone();

    let status = dev.interrupt();
    assert!(
        status.success(),
        "fleetrun dev exited with {status} after SIGINT"
    );

    let dev_again = Dev::start(&data_dir, &log);
    assert_eq!(
        dev_again.env["FLEETRUN_TOKEN"], dev.env["FLEETRUN_TOKEN"],
        "the token changed on restart"
    );
    let dev = dev_again;
    let listed = dev.fleetrun(&["runs", "list"]).success();
    assert!(
        listed.contains(&run_id),
        "the earlier run is gone:\n{listed}"
    );
    dev.wait_for_one_online_machine();
    let machines = dev.machines();
    assert_eq!(machines.len(), 1, "{machines:?}");
    assert_eq!(
        machines[0]["id"], machine_id,
        "the local agent enrolled again"
    );
    let table = dev.fleetrun(&["machines", "list"]).success();
    assert_eq!(table.matches("online").count(), 1, "{table}");
}
