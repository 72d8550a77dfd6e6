//! The test harness: a `Cluster` of real `fleetrun` processes (one server, any number of
//! agents) on loopback in a temporary directory, driven through the CLI and the REST API.
//!
//! Nothing here sleeps to make a test pass: every wait polls a condition against a deadline
//! and panics with what it was waiting for. Every process started is killed and reaped when its
//! guard drops, and a failing test prints the daemons' logs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub(crate) const FLEETRUN: &str = env!("CARGO_BIN_EXE_fleetrun");

/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(20);
/// Longest a daemon may take to come up or a CLI command to finish.
const STARTUP: Duration = Duration::from_secs(20);
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Waits until `condition` holds, polling every 20 ms; panics after `timeout`, saying `what`
/// it was waiting for.
pub(crate) fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    // Bounded in count as well as in time, in case a condition is itself slow.
    let most_polls = timeout.as_millis() / POLL.as_millis() + 2;
    for _ in 0..most_polls {
        if condition() {
            return;
        }
        if started.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(POLL);
    }
    panic!("timed out after {timeout:?} waiting until {what}");
}

/// Waits for `child` to exit, at most `timeout`; kills it and panics past that.
pub(crate) fn wait_for_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let mut status = None;
    wait_until(timeout, &format!("{what} exits"), || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

/// Is any process of process group `pgid` still alive? Zombies count as dead: they have
/// exited and only wait for whoever inherited them (here, a PID 1 that may never reap) to
/// collect their status.
pub(crate) fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        panic!("/proc is needed to check process groups");
    };
    entries.flatten().any(|entry| {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            return false;
        };
        let Some((state, group)) = stat_state_and_group(pid) else {
            return false;
        };
        group == pgid && state != 'Z' && state != 'X'
    })
}

/// Is process `pid` still alive (not gone, not a zombie)?
pub(crate) fn process_alive(pid: i32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    match kill(Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => false,
        _ => stat_state_and_group(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X'),
    }
}

/// The state letter and process group of `pid`, from `/proc/<pid>/stat`.
fn stat_state_and_group(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: read after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

/// Reads a pid a script wrote to `path`, waiting until the file holds one.
pub(crate) fn read_pid(path: &Path) -> i32 {
    let mut pid = None;
    wait_until(
        Duration::from_secs(10),
        &format!("{} holds a pid", path.display()),
        || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| text.trim().parse().ok());
            pid.is_some()
        },
    );
    pid.expect("pid")
}

/// Environment variables of the developer's shell that must not leak into the processes
/// under test.
const SCRUBBED: &[&str] = &[
    "FLEETRUN_URL",
    "FLEETRUN_TOKEN",
    "FLEETRUN_ENROLL_TOKEN",
    "FLEETRUN_SERVER",
    "FLEETRUN_CONFIG",
    "FLEETRUN_LOG",
];

fn command() -> Command {
    let mut command = Command::new(FLEETRUN);
    for name in SCRUBBED {
        command.env_remove(name);
    }
    command
}

/// A daemon (server, agent, dev) with its output going to a log file; killed and reaped on
/// drop.
pub(crate) struct Process {
    child: Child,
    pub(crate) log: PathBuf,
}

impl Process {
    /// Spawns `fleetrun args...` logging to `log`, at `FLEETRUN_LOG=log_filter` when given.
    pub(crate) fn spawn(args: &[String], log: &Path, log_filter: Option<&str>) -> Self {
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let stderr = stdout.try_clone().expect("clone log");
        let mut command = command();
        if let Some(filter) = log_filter {
            command.env("FLEETRUN_LOG", filter);
        }
        let child = command
            .args(args)
            // Plain logs, readable when a failing test prints them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn fleetrun");
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Panics, with the log, if the process has already exited.
    pub(crate) fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("{what} exited ({status}):\n{}", read_log(&self.log));
        }
    }

    /// SIGKILL, then reap.
    pub(crate) fn kill(mut self) {
        self.kill_and_reap();
    }

    fn kill_and_reap(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` and waits for the exit.
    pub(crate) fn stop_with(mut self, signal: nix::sys::signal::Signal, what: &str) -> ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .expect("send signal");
        wait_for_exit(&mut self.child, Duration::from_secs(15), what)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The end is what matters; keep failure reports readable.
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(150);
    lines[start..].join("\n")
}

/// What a CLI command did.
pub(crate) struct Output {
    pub(crate) code: i32,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics unless the command succeeded; answers its stdout as text.
    pub(crate) fn success(&self) -> String {
        assert_eq!(
            self.code,
            0,
            "command failed; stdout:\n{}\nstderr:\n{}",
            self.stdout_text(),
            self.stderr
        );
        self.stdout_text()
    }
}

/// Runs `fleetrun args...` with `env`, feeding it `stdin`, at most `COMMAND_LIMIT`.
pub(crate) fn run_cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    let mut child = command()
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetrun");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(bytes).expect("write stdin");
    }
    let mut stdout_pipe = child.stdout.take().expect("stdout");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stdout = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut bytes);
        bytes
    });
    let stderr = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        bytes
    });
    let mut status = None;
    let started = Instant::now();
    while status.is_none() && started.elapsed() < COMMAND_LIMIT {
        status = child.try_wait().expect("try_wait");
        if status.is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`fleetrun {}` did not finish within {COMMAND_LIMIT:?}",
            args.join(" ")
        );
    };
    let stdout = stdout.join().expect("stdout reader");
    let stderr = String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned();
    Output {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

/// The `KEY=value` lines of an env file (`server.env`, `dev.env`), if it is there.
pub(crate) fn read_env_file(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let values: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    let complete = ["FLEETRUN_URL", "FLEETRUN_TOKEN", "FLEETRUN_ENROLL_TOKEN"]
        .iter()
        .all(|key| values.contains_key(*key));
    complete.then_some(values)
}

/// The inode of `path`, if it exists: the server replaces its env file by renaming a new one
/// over it, so a new inode means a new write.
pub(crate) fn file_identity(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|metadata| metadata.ino())
}

/// The env file at `path` once it is written anew (not the one that was `previous`).
pub(crate) fn fresh_env_file(
    path: &Path,
    previous: Option<u64>,
) -> Option<BTreeMap<String, String>> {
    let current = file_identity(path)?;
    if Some(current) == previous {
        return None;
    }
    read_env_file(path)
}

/// A blocking HTTP client with a timeout longer than any `?wait=` the tests use.
pub(crate) fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

struct Agent {
    args: Vec<String>,
    process: Option<Process>,
}

/// One server and its agents, in a temporary directory.
pub(crate) struct Cluster {
    dir: tempfile::TempDir,
    server_args: Vec<String>,
    server: Option<Process>,
    agents: BTreeMap<String, Agent>,
    pub(crate) url: String,
    pub(crate) token: String,
    pub(crate) enroll_token: String,
    http: reqwest::blocking::Client,
    /// Process groups of scripts to kill when the cluster drops.
    groups: std::sync::Mutex<Vec<i32>>,
    log_filter: Option<String>,
}

impl Cluster {
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server started with `extra` flags (`--output-cap 1KiB`), and no agents yet.
    pub(crate) fn start_with(extra: &[&str]) -> Self {
        Self::start_logging(extra, None)
    }

    /// A server started with `extra` flags, whose daemons (server and agents) log at
    /// `FLEETRUN_LOG=log_filter` (`trace`) instead of the default.
    pub(crate) fn start_logging(extra: &[&str], log_filter: Option<&str>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("fleetrun-it-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let mut cluster = Self {
            dir,
            server_args: extra.iter().map(|arg| arg.to_string()).collect(),
            server: None,
            agents: BTreeMap::new(),
            url: String::new(),
            token: String::new(),
            enroll_token: String::new(),
            http: http_client(),
            groups: std::sync::Mutex::new(Vec::new()),
            log_filter: log_filter.map(str::to_string),
        };
        cluster.start_server("127.0.0.1:0");
        cluster
    }

    /// The temporary directory everything lives in.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh directory under the cluster's, for scripts to work in.
    pub(crate) fn scratch_dir(&self, name: &str) -> PathBuf {
        let path = self.dir().join("scratch").join(name);
        std::fs::create_dir_all(&path).expect("scratch dir");
        path.canonicalize().expect("canonical scratch dir")
    }

    fn start_server(&mut self, listen: &str) {
        let data_dir = self.dir().join("server");
        let env_file = data_dir.join("server.env");
        let previous = file_identity(&env_file);
        let mut args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            listen.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(self.server_args.iter().cloned());
        let mut server = Process::spawn(
            &args,
            &self.dir().join("logs/server.log"),
            self.log_filter.as_deref(),
        );
        let mut values = None;
        wait_until(STARTUP, "the server writes server.env", || {
            server.assert_running("the server");
            values = fresh_env_file(&env_file, previous);
            values.is_some()
        });
        let values = values.expect("server.env");
        if previous.is_some() {
            // The file in the data directory keeps the tokens valid across restarts.
            assert_eq!(
                values["FLEETRUN_TOKEN"], self.token,
                "the admin token changed on restart"
            );
            assert_eq!(
                values["FLEETRUN_ENROLL_TOKEN"], self.enroll_token,
                "the enroll token changed on restart"
            );
        }
        self.url = values["FLEETRUN_URL"].clone();
        self.token = values["FLEETRUN_TOKEN"].clone();
        self.enroll_token = values["FLEETRUN_ENROLL_TOKEN"].clone();
        self.server = Some(server);
        let health = format!("{}/healthz", self.url);
        wait_until(STARTUP, "GET /healthz answers 200", || {
            self.http
                .get(&health)
                .send()
                .is_ok_and(|response| response.status() == 200)
        });
    }

    /// Kills process group `pgid` (a script's) when the cluster drops, in case a failing test
    /// leaves it running.
    pub(crate) fn kill_group_on_drop(&self, pgid: i32) {
        if let Ok(mut groups) = self.groups.lock() {
            groups.push(pgid);
        }
    }

    /// The port the server listens on.
    pub(crate) fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("port in URL")
    }

    /// Stops the server (SIGKILL when `kill9`, else SIGTERM and a clean exit) and starts it
    /// again on the same port and data directory.
    pub(crate) fn restart_server(&mut self, kill9: bool) {
        self.stop_server(kill9);
        self.start_server_again();
    }

    /// Starts the server again, stopped by `stop_server`, on the same port and data directory.
    pub(crate) fn start_server_again(&mut self) {
        assert!(self.server.is_none(), "the server is running");
        self.start_server(&format!("127.0.0.1:{}", self.port()));
    }

    /// Stops the server; after SIGTERM it must exit cleanly.
    pub(crate) fn stop_server(&mut self, kill9: bool) {
        let server = self.server.take().expect("a running server");
        if kill9 {
            server.kill();
        } else {
            let status = server.stop_with(
                nix::sys::signal::Signal::SIGTERM,
                "the server after SIGTERM",
            );
            assert!(
                status.success(),
                "the server exited with {status} after SIGTERM"
            );
        }
    }

    pub(crate) fn agent_state_dir(&self, name: &str) -> PathBuf {
        self.dir().join("agents").join(name)
    }

    /// Starts agent `name` with `labels` and waits until it is online.
    pub(crate) fn agent(&mut self, name: &str, labels: &str) {
        self.agent_with(name, labels, &[]);
    }

    /// Starts agent `name` with `labels` and `extra` flags and waits until it is online.
    pub(crate) fn agent_with(&mut self, name: &str, labels: &str, extra: &[&str]) {
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            self.url.clone(),
            "--enroll-token".into(),
            self.enroll_token.clone(),
            "--name".into(),
            name.into(),
            "--labels".into(),
            labels.into(),
            "--state-dir".into(),
            self.agent_state_dir(name).display().to_string(),
            "--kill-grace".into(),
            "1s".into(),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        self.agents.insert(
            name.to_string(),
            Agent {
                args,
                process: None,
            },
        );
        self.start_agent(name);
    }

    /// Starts agent `name` again, as it was first started, and waits until it is online.
    pub(crate) fn start_agent(&mut self, name: &str) {
        let log = self.dir().join(format!("logs/agent-{name}.log"));
        let log_filter = self.log_filter.clone();
        let agent = self.agents.get_mut(name).expect("a known agent");
        assert!(agent.process.is_none(), "agent {name} is already running");
        agent.process = Some(Process::spawn(&agent.args, &log, log_filter.as_deref()));
        wait_until(STARTUP, &format!("machine {name} is online"), || {
            if let Some(process) = self
                .agents
                .get_mut(name)
                .and_then(|agent| agent.process.as_mut())
            {
                process.assert_running(&format!("agent {name}"));
            }
            self.machine_status(name).as_deref() == Some("online")
        });
    }

    /// Kills agent `name` (SIGKILL: no goodbye to the server, no cleanup).
    pub(crate) fn kill_agent(&mut self, name: &str) {
        let agent = self.agents.get_mut(name).expect("a known agent");
        agent.process.take().expect("a running agent").kill();
    }

    /// Kills agent `name` and waits until the server sees it offline.
    pub(crate) fn stop_agent(&mut self, name: &str) {
        self.kill_agent(name);
        self.wait_machine_status(name, "offline");
    }

    /// Panics, with its log, if agent `name` has exited.
    pub(crate) fn assert_agent_running(&mut self, name: &str) {
        let agent = self.agents.get_mut(name).expect("a known agent");
        agent
            .process
            .as_mut()
            .expect("a started agent")
            .assert_running(&format!("agent {name}"));
    }

    /// Runs the CLI against this cluster.
    pub(crate) fn fleetrun(&self, args: &[&str]) -> Output {
        run_cli(
            args,
            &[("FLEETRUN_URL", &self.url), ("FLEETRUN_TOKEN", &self.token)],
            None,
        )
    }

    /// Runs the CLI against this cluster with `stdin`.
    pub(crate) fn fleetrun_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        run_cli(
            args,
            &[("FLEETRUN_URL", &self.url), ("FLEETRUN_TOKEN", &self.token)],
            Some(stdin),
        )
    }

    /// A request with `token` (or none).
    pub(crate) fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::blocking::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn json_of(response: reqwest::blocking::Response) -> (u16, Value) {
        let status = response.status().as_u16();
        let body = response.bytes().expect("response body");
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|error| {
                panic!("not JSON ({error}): {}", String::from_utf8_lossy(&body))
            })
        };
        (status, value)
    }

    /// POST `body` as the admin: the status and the JSON answer.
    pub(crate) fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::POST, path, Some(&self.token))
            .json(body)
            .send()
            .expect("POST");
        Self::json_of(response)
    }

    /// GET as the admin: the status and the JSON answer.
    pub(crate) fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::GET, path, Some(&self.token))
            .send()
            .expect("GET");
        Self::json_of(response)
    }

    /// GET as the admin, which must answer 200.
    pub(crate) fn get_json(&self, path: &str) -> Value {
        let (status, value) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    /// Creates a run, which must be accepted.
    pub(crate) fn create_run(&self, body: Value) -> Value {
        let (status, run) = self.post_json("/v1/runs", &body);
        assert_eq!(status, 201, "POST /v1/runs {body}: {run}");
        run
    }

    /// How many runs the server has.
    pub(crate) fn run_count(&self) -> usize {
        self.get_json("/v1/runs?limit=1000")["runs"]
            .as_array()
            .expect("runs")
            .len()
    }

    /// The id of the newest run.
    pub(crate) fn newest_run_id(&self) -> String {
        let runs = self.get_json("/v1/runs?limit=1");
        runs["runs"][0]["id"].as_str().expect("a run").to_string()
    }

    /// Waits until run `id` is done, through `?wait=` long polls; answers it.
    pub(crate) fn wait_run(&self, id: &str) -> Value {
        let started = Instant::now();
        for _ in 0..6 {
            let run = self.get_json(&format!("/v1/runs/{id}?wait=10s"));
            if ["succeeded", "failed", "canceled"].contains(&run["status"].as_str().unwrap_or("")) {
                return run;
            }
        }
        panic!(
            "run {id} is not done after {:?}: {}",
            started.elapsed(),
            self.get_json(&format!("/v1/runs/{id}"))
        );
    }

    /// The execution of run `id` on machine `name`, as it is now.
    pub(crate) fn execution(&self, id: &str, name: &str) -> Value {
        let run = self.get_json(&format!("/v1/runs/{id}"));
        run["executions"]
            .as_array()
            .expect("executions")
            .iter()
            .find(|execution| execution["machine_name"] == name)
            .unwrap_or_else(|| panic!("run {id} has no execution on {name}: {run}"))
            .clone()
    }

    /// Waits until the execution of run `id` on `name` is in `state`; answers it.
    pub(crate) fn wait_execution_state(
        &self,
        id: &str,
        name: &str,
        state: &str,
        timeout: Duration,
    ) -> Value {
        let mut last = Value::Null;
        let started = Instant::now();
        let most_polls = timeout.as_millis() / POLL.as_millis() + 2;
        for _ in 0..most_polls {
            last = self.execution(id, name);
            if last["state"] == state {
                return last;
            }
            if started.elapsed() >= timeout {
                break;
            }
            std::thread::sleep(POLL);
        }
        panic!("execution of run {id} on {name} is not {state} after {timeout:?}: {last}");
    }

    /// The stored bytes of one output stream of an execution.
    pub(crate) fn output(&self, execution_id: &str, stream: &str) -> Vec<u8> {
        let response = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/executions/{execution_id}/output/{stream}"),
                Some(&self.token),
            )
            .send()
            .expect("GET output");
        assert_eq!(response.status(), 200, "GET output of {execution_id}");
        response.bytes().expect("output bytes").to_vec()
    }

    /// Machine `name` as the server shows it, if enrolled.
    pub(crate) fn machine(&self, name: &str) -> Option<Value> {
        let machines = self.get_json("/v1/machines");
        machines["machines"]
            .as_array()
            .expect("machines")
            .iter()
            .find(|machine| machine["name"] == name)
            .cloned()
    }

    pub(crate) fn machine_status(&self, name: &str) -> Option<String> {
        self.machine(name)
            .and_then(|machine| machine["status"].as_str().map(str::to_string))
    }

    pub(crate) fn wait_machine_status(&self, name: &str, status: &str) {
        wait_until(
            Duration::from_secs(15),
            &format!("machine {name} is {status}"),
            || self.machine_status(name).as_deref() == Some(status),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let agents: Vec<(String, Process)> = std::mem::take(&mut self.agents)
            .into_iter()
            .filter_map(|(name, agent)| agent.process.map(|process| (name, process)))
            .collect();
        let server = self.server.take();
        // Agents first, and gently, so that they stop their scripts; all at once, so that
        // their kill grace periods overlap.
        let mut stopping = Vec::new();
        for (_, agent) in agents {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.pid()),
                nix::sys::signal::Signal::SIGTERM,
            );
            stopping.push(agent);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for mut agent in stopping {
            while Instant::now() < deadline && agent.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(POLL);
            }
            agent.kill();
        }
        // Whatever a test saw a script leave behind (a failed test may leave it running).
        for pgid in self
            .groups
            .lock()
            .map(|groups| groups.clone())
            .unwrap_or_default()
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(server) = server {
            server.kill();
        }
        if std::thread::panicking() {
            let Ok(entries) = std::fs::read_dir(self.dir().join("logs")) else {
                return;
            };
            for entry in entries.flatten() {
                eprintln!(
                    "----- {} -----\n{}",
                    entry.path().display(),
                    read_log(&entry.path())
                );
            }
        }
    }
}
