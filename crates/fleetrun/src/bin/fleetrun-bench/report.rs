//! The results: a table with each measure's min/median/max next to its target, and the same
//! as JSON.

use std::time::Duration;

use comfy_table::presets::ASCII_MARKDOWN;
use comfy_table::{CellAlignment, Table};
use serde_json::{Value, json};

use crate::measure::{FanoutSample, SimulatedResult, Spread};
use crate::real::RealResult;

/// Agents up to which a fan-out must take under a second (the 10,000).
const FANOUT_TARGET_AGENTS: usize = 10_000;
const FANOUT_TARGET_S: f64 = 1.0;
/// Agents from which the target is "holds them and a fan-out completes" (the 100,000).
const HOLD_TARGET_AGENTS: usize = 100_000;
const SERVER_KIB_PER_AGENT: f64 = 16.0;
const AGENT_RSS_MIB: f64 = 8.0;
const AGENT_CPU_PCT: f64 = 0.1;
const REAL_FANOUT_S: f64 = 0.25;
const ROUND_TRIP_MS: f64 = 20.0;

pub(crate) struct Report {
    pub(crate) simulated: Vec<(usize, anyhow::Result<SimulatedResult>)>,
    pub(crate) real: Option<(usize, anyhow::Result<RealResult>)>,
    /// Runs started at once per throughput trial.
    pub(crate) burst: usize,
}

/// A target: the median must be below `limit`.
struct Below {
    text: String,
    limit: f64,
}

fn below(limit: f64, unit: &str) -> Option<Below> {
    Some(Below {
        text: format!("< {limit} {unit}"),
        limit,
    })
}

/// Rows of the table being built.
struct Rows(Table);

impl Rows {
    fn new() -> Self {
        let mut table = Table::new();
        table
            .load_preset(ASCII_MARKDOWN)
            .set_header(["measure", "min", "median", "max", "target", "result"]);
        for column in 1..4 {
            if let Some(column) = table.column_mut(column) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        Self(table)
    }

    /// A measure with its spread, shown with `digits` decimals, and its target if it has one.
    fn add(&mut self, measure: &str, spread: Option<Spread>, digits: usize, target: Option<Below>) {
        let value = |value: f64| format!("{value:.digits$}");
        let (min, median, max) = match spread {
            Some(spread) => (value(spread.min), value(spread.median), value(spread.max)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let (target, verdict) = match (target, spread) {
            (Some(target), Some(spread)) => {
                let verdict = verdict(spread.median, target.limit);
                (target.text, verdict)
            }
            (Some(target), None) => (target.text, "miss (not measured)".to_string()),
            (None, _) => (String::new(), String::new()),
        };
        self.0
            .add_row([measure.to_string(), min, median, max, target, verdict]);
    }

    /// A yes/no target, such as "holds them and a fan-out completes".
    fn add_check(&mut self, measure: &str, outcome: &str, target: &str, passed: bool) {
        let verdict = if passed { "pass" } else { "miss" };
        self.0.add_row([
            measure.to_string(),
            String::new(),
            outcome.to_string(),
            String::new(),
            target.to_string(),
            verdict.to_string(),
        ]);
    }
}

/// `pass`, or `miss` with how far off the median is.
fn verdict(median: f64, limit: f64) -> String {
    if median < limit {
        "pass".to_string()
    } else {
        format!("miss ({:.1}x)", median / limit)
    }
}

fn seconds(values: impl IntoIterator<Item = Duration>) -> Option<Spread> {
    Spread::of(values.into_iter().map(|value| value.as_secs_f64()))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Server RSS per connected agent over the server with none enrolled, in KiB.
fn kib_per_agent(result: &SimulatedResult, agents: usize) -> f64 {
    (result.rss_connected_kib as f64 - result.rss_idle_kib as f64) / agents as f64
}

/// The moments the simulated agents saw, across trials.
fn probe_moments(
    samples: &[FanoutSample],
    moment: impl Fn(&crate::fleet::ProbeReading) -> Option<Duration>,
) -> Option<Spread> {
    seconds(
        samples
            .iter()
            .filter_map(|sample| sample.probe.as_ref().and_then(&moment)),
    )
}

impl Report {
    /// An error was met somewhere: the process should exit non-zero.
    pub(crate) fn failed(&self) -> bool {
        self.simulated.iter().any(|(_, result)| result.is_err())
            || self
                .real
                .as_ref()
                .is_some_and(|(_, result)| result.is_err())
    }

    pub(crate) fn table(&self) -> String {
        let mut rows = Rows::new();
        for (agents, result) in &self.simulated {
            match result {
                Ok(result) => self.simulated_rows(&mut rows, *agents, result),
                Err(_) => failed_rows(&mut rows, *agents),
            }
        }
        match &self.real {
            Some((count, Ok(result))) => real_rows(&mut rows, *count, result),
            Some((count, Err(_))) => {
                rows.add_check(
                    &format!("{count} real agents: FAILED (below)"),
                    "",
                    "measured",
                    false,
                );
            }
            None => {}
        }
        let mut text = rows.0.to_string();
        for (what, error) in self.failures() {
            text.push_str(&format!("\n{what} failed: {error:#}"));
        }
        text
    }

    /// What could not be measured, and why.
    fn failures(&self) -> Vec<(String, &anyhow::Error)> {
        let simulated = self.simulated.iter().filter_map(|(agents, result)| {
            let error = result.as_ref().err()?;
            Some((format!("{agents} simulated agents"), error))
        });
        let real = self.real.iter().filter_map(|(count, result)| {
            let error = result.as_ref().err()?;
            Some((format!("{count} real agents"), error))
        });
        simulated.chain(real).collect()
    }

    fn simulated_rows(&self, rows: &mut Rows, agents: usize, result: &SimulatedResult) {
        let samples = &result.fanout;
        let fanout_target = if agents <= FANOUT_TARGET_AGENTS {
            below(FANOUT_TARGET_S, "s")
        } else {
            None
        };
        rows.add(
            &format!("{agents} simulated: fan-out to all, stored (s)"),
            seconds(samples.iter().map(|sample| sample.total)),
            3,
            fanout_target,
        );
        if agents >= HOLD_TARGET_AGENTS {
            rows.add_check(
                &format!("{agents} simulated: held, fan-out completes"),
                "yes",
                "holds them, completes",
                true,
            );
        }
        rows.add(
            "  first result (s)",
            seconds(samples.iter().filter_map(|sample| sample.first_result)),
            3,
            None,
        );
        rows.add(
            &format!("  executions/s ({} runs at once)", self.burst),
            Spread::of(result.executions_per_s.iter().copied()),
            0,
            None,
        );
        rows.add(
            "  phase: POST /v1/runs answered (s)",
            seconds(samples.iter().map(|sample| sample.post)),
            3,
            None,
        );
        rows.add(
            "  phase: first Execute at an agent (s)",
            probe_moments(samples, |probe| probe.first_execute),
            3,
            None,
        );
        rows.add(
            "  phase: last Execute at an agent (s)",
            probe_moments(samples, |probe| probe.last_execute),
            3,
            None,
        );
        rows.add(
            "  phase: last Ack at an agent (s)",
            probe_moments(samples, |probe| probe.last_ack),
            3,
            None,
        );
        rows.add(
            "  server CPU in a fan-out (% core)",
            Spread::of(samples.iter().map(|sample| sample.server_cpu_pct)),
            0,
            None,
        );
        rows.add(
            "  load generator CPU in a fan-out (% core)",
            Spread::of(samples.iter().map(|sample| sample.agents_cpu_pct)),
            0,
            None,
        );
        let single = |value: f64| Some(Spread::single(value));
        rows.add(
            "  server RSS, nothing enrolled (MiB)",
            single(mib(result.rss_idle_kib)),
            1,
            None,
        );
        rows.add(
            "  server RSS, all enrolled, none connected (MiB)",
            single(mib(result.rss_enrolled_kib)),
            1,
            None,
        );
        rows.add(
            "  server RSS, all connected, idle (MiB)",
            single(mib(result.rss_connected_kib)),
            1,
            None,
        );
        rows.add(
            "  server RSS per connected agent (KiB)",
            single(kib_per_agent(result, agents)),
            1,
            below(SERVER_KIB_PER_AGENT, "KiB"),
        );
        rows.add(
            "  server RSS after the runs (MiB)",
            single(mib(result.rss_after_kib)),
            1,
            None,
        );
        rows.add(
            "  server CPU, all idle (% core)",
            single(result.idle_cpu_pct),
            2,
            None,
        );
        rows.add(
            "  enrolling all (s)",
            single(result.enroll.as_secs_f64()),
            1,
            None,
        );
        rows.add(
            "  connecting all (s)",
            single(result.connect.as_secs_f64()),
            1,
            None,
        );
    }

    pub(crate) fn json(&self) -> Value {
        let mut objects: Vec<Value> = self
            .simulated
            .iter()
            .map(|(agents, result)| match result {
                Ok(result) => simulated_json(*agents, result),
                Err(error) => json!({"agents": agents, "error": format!("{error:#}")}),
            })
            .collect();
        match &self.real {
            Some((count, Ok(result))) => objects.push(real_json(*count, result)),
            Some((count, Err(error))) => {
                objects.push(json!({"real_agents": count, "error": format!("{error:#}")}));
            }
            None => {}
        }
        Value::Array(objects)
    }
}

fn failed_rows(rows: &mut Rows, agents: usize) {
    let target = if agents >= HOLD_TARGET_AGENTS {
        "holds them, completes".to_string()
    } else if agents <= FANOUT_TARGET_AGENTS {
        format!("< {FANOUT_TARGET_S} s")
    } else {
        "measured".to_string()
    };
    rows.add_check(
        &format!("{agents} simulated: FAILED (below)"),
        "",
        &target,
        false,
    );
}

fn real_rows(rows: &mut Rows, count: usize, result: &RealResult) {
    let samples = &result.fanout;
    rows.add(
        &format!("{count} real agents: echo hi on all (s)"),
        seconds(samples.iter().map(|sample| sample.total)),
        3,
        below(REAL_FANOUT_S, "s"),
    );
    rows.add(
        "  first result (s, stored times)",
        seconds(samples.iter().filter_map(|sample| sample.first_result)),
        3,
        None,
    );
    rows.add(
        "  phase: POST /v1/runs answered (s)",
        seconds(samples.iter().map(|sample| sample.post)),
        3,
        None,
    );
    rows.add(
        "  server CPU in a fan-out (% core)",
        Spread::of(samples.iter().map(|sample| sample.server_cpu_pct)),
        0,
        None,
    );
    rows.add(
        "  all agents' CPU in a fan-out (% core)",
        Spread::of(samples.iter().map(|sample| sample.agents_cpu_pct)),
        0,
        None,
    );
    rows.add(
        "  CLI round trip, one target (ms)",
        Spread::of(
            result
                .round_trips
                .iter()
                .map(|time| time.as_secs_f64() * 1e3),
        ),
        1,
        below(ROUND_TRIP_MS, "ms"),
    );
    rows.add(
        "  agent RSS, idle before any run (MiB)",
        Some(Spread::single(mib(result.rss_fresh_kib))),
        1,
        None,
    );
    rows.add(
        "  agent RSS, idle after the runs (MiB)",
        Some(Spread::single(mib(result.idle.rss))),
        1,
        below(AGENT_RSS_MIB, "MiB"),
    );
    rows.add(
        "    of which its own (RssAnon, MiB)",
        Some(Spread::single(mib(result.idle.anon))),
        1,
        None,
    );
    rows.add(
        "    shared pages split (PSS, MiB)",
        Some(Spread::single(mib(result.idle.pss))),
        1,
        None,
    );
    rows.add(
        "  agent CPU, idle (% core)",
        Some(Spread::single(result.idle_cpu_pct)),
        3,
        below(AGENT_CPU_PCT, "%"),
    );
}

fn simulated_json(agents: usize, result: &SimulatedResult) -> Value {
    let samples = &result.fanout;
    let fanout = seconds(samples.iter().map(|sample| sample.total));
    let first = seconds(samples.iter().filter_map(|sample| sample.first_result));
    let rate = Spread::of(result.executions_per_s.iter().copied());
    let median = |spread: Option<Spread>| spread.map(|spread| spread.median);
    json!({
        "agents": agents,
        "trials": samples.len(),
        "fanout_min_s": fanout.map(|spread| spread.min),
        "fanout_median_s": median(fanout),
        "fanout_max_s": fanout.map(|spread| spread.max),
        "first_result_min_s": first.map(|spread| spread.min),
        "first_result_median_s": median(first),
        "first_result_max_s": first.map(|spread| spread.max),
        "executions_per_s": median(rate),
        "executions_per_s_min": rate.map(|spread| spread.min),
        "executions_per_s_max": rate.map(|spread| spread.max),
        "post_answered_median_s": median(seconds(samples.iter().map(|sample| sample.post))),
        "first_execute_median_s": median(probe_moments(samples, |probe| probe.first_execute)),
        "last_execute_median_s": median(probe_moments(samples, |probe| probe.last_execute)),
        "last_ack_median_s": median(probe_moments(samples, |probe| probe.last_ack)),
        "server_fanout_cpu_pct": median(Spread::of(samples.iter().map(|sample| sample.server_cpu_pct))),
        "generator_fanout_cpu_pct": median(Spread::of(samples.iter().map(|sample| sample.agents_cpu_pct))),
        "server_rss_idle_mib": mib(result.rss_idle_kib),
        "server_rss_enrolled_mib": mib(result.rss_enrolled_kib),
        "server_rss_mib": mib(result.rss_connected_kib),
        "server_rss_after_runs_mib": mib(result.rss_after_kib),
        "server_rss_per_agent_kib": kib_per_agent(result, agents),
        "server_idle_cpu_pct": result.idle_cpu_pct,
        "enroll_s": result.enroll.as_secs_f64(),
        "connect_s": result.connect.as_secs_f64(),
    })
}

fn real_json(count: usize, result: &RealResult) -> Value {
    let samples = &result.fanout;
    let fanout = seconds(samples.iter().map(|sample| sample.total));
    let trips = Spread::of(
        result
            .round_trips
            .iter()
            .map(|time| time.as_secs_f64() * 1e3),
    );
    let first = seconds(samples.iter().filter_map(|sample| sample.first_result));
    json!({
        "real_agents": count,
        "trials": samples.len(),
        "real_fanout_min_s": fanout.map(|spread| spread.min),
        "real_fanout_median_s": fanout.map(|spread| spread.median),
        "real_fanout_max_s": fanout.map(|spread| spread.max),
        "real_first_result_median_s": first.map(|spread| spread.median),
        "round_trip_min_ms": trips.map(|spread| spread.min),
        "round_trip_median_ms": trips.map(|spread| spread.median),
        "round_trip_max_ms": trips.map(|spread| spread.max),
        "agent_fresh_rss_mib": mib(result.rss_fresh_kib),
        "agent_idle_rss_mib": mib(result.idle.rss),
        "agent_idle_anon_mib": mib(result.idle.anon),
        "agent_idle_pss_mib": mib(result.idle.pss),
        "agent_idle_cpu_pct": result.idle_cpu_pct,
    })
}
