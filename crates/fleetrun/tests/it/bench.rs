//! The benchmark's smoke test: `fleetrun-bench` with a handful of agents, so that it cannot
//! rot. It checks that every measure is taken and sane, not how fast anything is.

use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::FLEETRUN;

const BENCH: &str = env!("CARGO_BIN_EXE_fleetrun-bench");

/// Waits for `child` at most `limit`; past that, kills it (it then stops everything it
/// started) and panics.
fn wait_or_kill(child: &mut Child, limit: Duration) -> ExitStatus {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    panic!("fleetrun-bench did not finish within {limit:?}");
}

/// `value[key]` as a number, or a panic that shows the object.
fn number(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number in {value:#}"))
}

#[test]
fn bench_measures_simulated_and_real_agents() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("out.json");
    let log = dir.path().join("bench.log");
    let stdout = File::create(&log).expect("log file");
    let stderr = stdout.try_clone().expect("log file handle");
    let mut bench = Command::new(BENCH)
        .args(["--agents", "20", "--real-agents", "2", "--trials", "1"])
        // Short idle windows and pauses: this checks that the benchmark works, not the figures.
        .args([
            "--round-trips",
            "2",
            "--cpu-window",
            "200ms",
            "--settle",
            "100ms",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--fleetrun")
        .arg(FLEETRUN)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn fleetrun-bench");
    let status = wait_or_kill(&mut bench, Duration::from_secs(120));
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "fleetrun-bench failed ({status}):\n{printed}"
    );
    assert!(
        printed.contains("20 simulated: fan-out to all") && printed.contains("2 real agents"),
        "the table names both measurements:\n{printed}"
    );

    let results: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON file")).expect("JSON");
    let results = results.as_array().expect("a JSON array");
    assert_eq!(results.len(), 2, "{results:#?}");

    let simulated = &results[0];
    assert_eq!(simulated["agents"], 20, "{simulated:#}");
    let (min, median, max) = (
        number(simulated, "fanout_min_s"),
        number(simulated, "fanout_median_s"),
        number(simulated, "fanout_max_s"),
    );
    assert!(0.0 < min && min <= median && median <= max, "{simulated:#}");
    let first_result = number(simulated, "first_result_median_s");
    assert!(0.0 < first_result && first_result <= max, "{simulated:#}");
    assert!(number(simulated, "executions_per_s") > 0.0, "{simulated:#}");
    assert!(number(simulated, "server_rss_mib") > 1.0, "{simulated:#}");
    // The difference of two RSS readings: any finite value is possible with 20 agents.
    assert!(
        number(simulated, "server_rss_per_agent_kib").is_finite(),
        "{simulated:#}"
    );
    assert!(
        number(simulated, "server_idle_cpu_pct") >= 0.0,
        "{simulated:#}"
    );

    let real = &results[1];
    assert_eq!(real["real_agents"], 2, "{real:#}");
    assert!(number(real, "real_fanout_median_s") > 0.0, "{real:#}");
    assert!(number(real, "round_trip_median_ms") > 0.0, "{real:#}");
    assert!(number(real, "agent_idle_rss_mib") > 0.5, "{real:#}");
    assert!(number(real, "agent_idle_cpu_pct") >= 0.0, "{real:#}");
}
