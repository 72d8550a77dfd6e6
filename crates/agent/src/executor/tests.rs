//! The executor against real processes in temporary directories.

use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::test_support::{eventually, execute, live_group_members, within};

const LIMIT: Duration = Duration::from_secs(20);

struct Harness {
    _dir: tempfile::TempDir,
    placement: Placement,
}

impl Harness {
    fn new(kill_grace: Duration) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let output = OutputPaths {
            stdout: dir.path().join("stdout"),
            stderr: dir.path().join("stderr"),
        };
        fs::write(&output.stdout, b"").expect("stdout file");
        fs::write(&output.stderr, b"").expect("stderr file");
        let placement = Placement {
            work_root: dir.path().join("work"),
            output,
            kill_grace,
        };
        Self {
            _dir: dir,
            placement,
        }
    }

    fn stdout(&self) -> Vec<u8> {
        fs::read(&self.placement.output.stdout).expect("stdout readable")
    }

    fn stderr(&self) -> Vec<u8> {
        fs::read(&self.placement.output.stderr).expect("stderr readable")
    }

    /// Runs to the end and returns the end with the captured stdout and stderr.
    async fn run(&self, execute: &Execute) -> (ExecutionEnd, String, String) {
        // Each run starts with empty output files, as a fresh journal entry does.
        fs::write(&self.placement.output.stdout, b"").expect("stdout file");
        fs::write(&self.placement.output.stderr, b"").expect("stderr file");
        let (_stop, stop_watch) = watch::channel(false);
        let end = within(
            LIMIT,
            "execution",
            run(execute, &self.placement, stop_watch, ignore()),
        )
        .await;
        let stdout = String::from_utf8_lossy(&self.stdout()).into_owned();
        let stderr = String::from_utf8_lossy(&self.stderr()).into_owned();
        (end, stdout, stderr)
    }
}

fn ignore() -> OutputObserver {
    Arc::new(|_, _| {})
}

/// An observer that publishes stdout's length, to wait for a script to say it is ready.
fn stdout_watch() -> (OutputObserver, watch::Receiver<u64>) {
    let (sender, receiver) = watch::channel(0);
    let observer: OutputObserver = Arc::new(move |stream, length| {
        if stream == Stream::Stdout {
            sender.send_replace(length);
        }
    });
    (observer, receiver)
}

/// `start` with the execution's inline script.
async fn start_inline(
    execute: &Execute,
    placement: &Placement,
) -> Result<RunningScript, ExecutionEnd> {
    start(execute, execute.script.clone().into_bytes(), placement).await
}

fn pgid_of(script: &RunningScript) -> i32 {
    i32::try_from(script.pid()).expect("pid fits")
}

#[tokio::test]
async fn exit_codes_decide_the_outcome() {
    let harness = Harness::new(Duration::from_secs(1));
    let (end, _, _) = harness.run(&execute("exit 0")).await;
    assert_eq!(
        (end.outcome, end.exit_code, end.message),
        (Outcome::Succeeded, Some(0), None)
    );
    assert!(
        end.started_at
            .is_some_and(|started| started <= end.finished_at)
    );

    let (end, _, _) = harness.run(&execute("exit 3")).await;
    assert_eq!(
        (end.outcome, end.exit_code, end.message),
        (Outcome::Failed, Some(3), None)
    );
}

#[tokio::test]
async fn a_signal_not_sent_by_the_agent_is_a_failure() {
    let harness = Harness::new(Duration::from_secs(1));
    let (end, _, _) = harness.run(&execute("kill -9 $$")).await;
    assert_eq!(end.outcome, Outcome::Failed);
    assert_eq!(end.exit_code, Some(137));
    assert_eq!(
        end.message.as_deref(),
        Some("terminated by signal 9 (SIGKILL)")
    );
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_apart() {
    let harness = Harness::new(Duration::from_secs(1));
    let (end, stdout, stderr) = harness
        .run(&execute("echo out; echo err >&2; echo more"))
        .await;
    assert_eq!(stdout, "out\nmore\n");
    assert_eq!(stderr, "err\n");
    assert_eq!(
        end.stdout,
        StreamTotals {
            kept: 9,
            dropped: 0
        }
    );
    assert_eq!(
        end.stderr,
        StreamTotals {
            kept: 4,
            dropped: 0
        }
    );
}

#[tokio::test]
async fn binary_output_is_byte_exact() {
    let harness = Harness::new(Duration::from_secs(1));
    let (end, _, _) = harness
        .run(&execute(r"printf '\377\000\001'; printf '\303' >&2"))
        .await;
    assert_eq!(end.outcome, Outcome::Succeeded);
    assert_eq!(harness.stdout(), vec![0xff, 0x00, 0x01]);
    assert_eq!(harness.stderr(), vec![0xc3]);
}

#[tokio::test]
async fn output_beyond_the_cap_is_counted_and_dropped() {
    let harness = Harness::new(Duration::from_secs(1));
    let mut capped = execute("head -c 200000 /dev/zero; echo done >&2");
    capped.output_cap_bytes = 1000;
    let (end, _, stderr) = harness.run(&capped).await;
    assert_eq!(
        end.stdout,
        StreamTotals {
            kept: 1000,
            dropped: 199_000
        }
    );
    assert_eq!(harness.stdout().len(), 1000);
    assert_eq!(stderr, "done\n", "each stream has its own cap");
}

#[tokio::test]
async fn the_environment_working_directory_and_stdin() {
    let harness = Harness::new(Duration::from_secs(1));
    let mut with_env = execute(
        "echo \"$GREETING $FLEETRUN_EXECUTION_ID $FLEETRUN_RUN_ID\"; pwd; cat; echo \"home=$HOME\"",
    );
    with_env
        .env
        .insert("GREETING".to_string(), "hello there".to_string());
    let (end, stdout, _) = harness.run(&with_env).await;
    assert_eq!(end.outcome, Outcome::Succeeded);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        format!("hello there {} {}", with_env.execution_id, with_env.run_id)
    );
    let work_dir = harness
        .placement
        .work_root
        .join(with_env.execution_id.to_string());
    assert_eq!(
        fs::canonicalize(lines[1]).ok(),
        None,
        "the per-execution directory is removed afterwards"
    );
    assert!(
        lines[1].ends_with(&with_env.execution_id.to_string()),
        "{}",
        lines[1]
    );
    assert!(!work_dir.exists());
    // stdin is /dev/null, so `cat` ended at once; the agent's own environment is inherited.
    assert_eq!(
        lines[2],
        format!("home={}", std::env::var("HOME").unwrap_or_default())
    );

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let mut in_dir = execute("pwd");
    in_dir.workdir = Some(elsewhere.path().display().to_string());
    let (_, stdout, _) = harness.run(&in_dir).await;
    assert_eq!(
        fs::canonicalize(stdout.trim()).expect("exists"),
        fs::canonicalize(elsewhere.path()).expect("exists")
    );
}

#[tokio::test]
async fn a_missing_working_directory_fails_by_name() {
    let harness = Harness::new(Duration::from_secs(1));
    let mut missing = execute("echo never");
    missing.workdir = Some("/no/such/dir".to_string());
    let (end, stdout, _) = harness.run(&missing).await;
    assert_eq!(
        (end.outcome, end.exit_code, end.started_at),
        (Outcome::Failed, None, None)
    );
    assert_eq!(
        end.message.as_deref(),
        Some("working directory `/no/such/dir` does not exist on this machine")
    );
    assert_eq!(stdout, "");
    assert!(
        !harness
            .placement
            .work_root
            .join(missing.execution_id.to_string())
            .exists()
    );
}

#[tokio::test]
async fn a_shebang_line_picks_the_interpreter() {
    let harness = Harness::new(Duration::from_secs(1));
    // `$0` is the script itself, and /proc says which program runs it.
    let (end, stdout, _) = harness
        .run(&execute(
            "#!/bin/sh\necho from sh; basename \"$0\"; readlink /proc/$$/exe\n",
        ))
        .await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.message);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["from sh", "script"]);
    let sh = fs::canonicalize("/bin/sh").expect("/bin/sh exists");
    assert_eq!(Path::new(lines[2]), sh, "run by /bin/sh");
    // The kernel runs the script file itself: with `#!/bin/cat` the output is the script.
    let cat = "#!/bin/cat\nthis line is data, not a command\n";
    let (end, stdout, _) = harness.run(&execute(cat)).await;
    assert_eq!(end.outcome, Outcome::Succeeded, "{:?}", end.message);
    assert_eq!(stdout, cat);
    // A script without one runs with bash when bash is installed.
    if find_program("bash").is_some() {
        let (_, stdout, _) = harness.run(&execute("readlink /proc/$$/exe")).await;
        assert!(stdout.trim_end().ends_with("/bash"), "{stdout}");
    }
}

#[tokio::test]
async fn a_spawn_failure_reports_the_os_error() {
    let harness = Harness::new(Duration::from_secs(1));
    // One environment string over the kernel's 128 KiB limit makes execve fail with E2BIG.
    let mut too_big = execute("echo never");
    too_big.env.insert("HUGE".to_string(), "x".repeat(200_000));
    let (end, _, _) = harness.run(&too_big).await;
    assert_eq!(
        (end.outcome, end.exit_code, end.started_at, end.error_code),
        (Outcome::Failed, None, None, None)
    );
    let message = end.message.unwrap_or_default();
    assert!(
        message.starts_with("could not start the script: "),
        "{message}"
    );
    assert!(message.contains("Argument list too long"), "{message}");
}

/// Asserts that `end` failed at once, without starting, for want of an interpreter, and
/// returns its message.
fn interpreter_not_found(end: &ExecutionEnd) -> String {
    assert_eq!(
        (end.outcome, end.exit_code, end.started_at, end.error_code),
        (
            Outcome::Failed,
            None,
            None,
            Some(ErrorCode::InterpreterNotFound)
        ),
        "{:?}",
        end.message
    );
    end.message.clone().unwrap_or_default()
}

#[tokio::test]
async fn a_missing_shebang_interpreter_is_named() {
    let harness = Harness::new(Duration::from_secs(1));
    let (end, _, _) = harness
        .run(&execute("#!/no/such/interpreter\necho never\n"))
        .await;
    assert_eq!(
        interpreter_not_found(&end),
        "the script's `#!` line names `/no/such/interpreter`, which is not installed on this \
         machine"
    );
    let (end, _, _) = harness
        .run(&execute(
            "#!/usr/bin/env no-such-interpreter-here\necho never\n",
        ))
        .await;
    assert!(
        interpreter_not_found(&end).contains("`no-such-interpreter-here`"),
        "{:?}",
        end.message
    );
}

#[tokio::test]
async fn an_explicit_interpreter_runs_the_script() {
    let harness = Harness::new(Duration::from_secs(1));
    let mut python = execute("import sys\nsys.stdout.write('from python')\nsys.exit(4)\n");
    python.interpreter = Some("python3".to_string());
    let (end, stdout, stderr) = harness.run(&python).await;
    if find_program("python3").is_none() {
        eprintln!("python3 is not installed here: checking that it is reported as missing");
        assert_eq!(
            interpreter_not_found(&end),
            "interpreter `python3` is not installed on this machine"
        );
        return;
    }
    assert_eq!(
        (end.outcome, end.exit_code),
        (Outcome::Failed, Some(4)),
        "{stderr}"
    );
    assert_eq!(stdout, "from python");

    let mut sh = execute("#!/no/such/interpreter\necho \"$0\"");
    sh.interpreter = Some("sh".to_string());
    let (end, stdout, _) = harness.run(&sh).await;
    assert_eq!(
        end.outcome,
        Outcome::Succeeded,
        "the named one beats the #! line"
    );
    assert!(stdout.trim_end().ends_with("/script"), "{stdout}");
}

#[tokio::test]
async fn a_missing_interpreter_fails_without_starting() {
    let harness = Harness::new(Duration::from_secs(1));
    let mut missing = execute("echo never");
    missing.interpreter = Some("no-such-interpreter-here".to_string());
    let (end, _, _) = harness.run(&missing).await;
    assert_eq!(
        interpreter_not_found(&end),
        "interpreter `no-such-interpreter-here` is not installed on this machine"
    );
}

#[tokio::test]
async fn windows_interpreters_are_not_found_elsewhere() {
    let harness = Harness::new(Duration::from_secs(1));
    for name in ["cmd", "powershell"] {
        let mut windows = execute("echo never");
        windows.interpreter = Some(name.to_string());
        let (end, _, _) = harness.run(&windows).await;
        assert_eq!(
            interpreter_not_found(&end),
            format!(
                "interpreter `{name}` is Windows-only and this machine runs {}",
                std::env::consts::OS
            )
        );
    }
}

#[tokio::test]
async fn a_ps1_first_line_asks_for_powershell() {
    let harness = Harness::new(Duration::from_secs(1));
    let script = "#ps1\nWrite-Output \"from pwsh $(Split-Path -Leaf $PSCommandPath)\"\n";
    let (end, stdout, stderr) = harness.run(&execute(script)).await;
    if find_program("pwsh").is_none() {
        eprintln!("pwsh is not installed here: checking that it is reported as missing");
        assert_eq!(
            interpreter_not_found(&end),
            "the script's first line `#ps1` asks for PowerShell, but `pwsh` is not installed \
             on this machine"
        );
        return;
    }
    assert_eq!(end.outcome, Outcome::Succeeded, "{stderr}");
    assert_eq!(stdout.trim_end(), "from pwsh script.ps1");
}

#[tokio::test]
async fn powershell_gets_its_flags_and_a_ps1_file() {
    // A stand-in `pwsh` first on the script's PATH prints how it was called, so the command
    // line is checked whether or not PowerShell is installed here.
    let bin = tempfile::tempdir().expect("tempdir");
    let fake = bin.path().join("pwsh");
    fs::write(
        &fake,
        "#!/bin/sh\nfor arg in \"$@\"; do echo \"$arg\"; done\nhead -n 1 \"$4\"\n",
    )
    .expect("stand-in written");
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("executable");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let harness = Harness::new(Duration::from_secs(1));
    let mut by_first_line = execute("#ps1\nWrite-Output hi\n");
    by_first_line.env.insert("PATH".to_string(), path.clone());
    let mut by_name = execute("Write-Output hi\n");
    by_name.interpreter = Some("pwsh".to_string());
    by_name.env.insert("PATH".to_string(), path);
    for powershell in [by_first_line, by_name] {
        let (end, stdout, stderr) = harness.run(&powershell).await;
        assert_eq!(end.outcome, Outcome::Succeeded, "{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 5, "{stdout}");
        assert_eq!(lines[..3], ["-NoProfile", "-NonInteractive", "-File"]);
        let work_dir = harness
            .placement
            .work_root
            .join(powershell.execution_id.to_string());
        assert_eq!(Path::new(lines[3]), work_dir.join("script.ps1"));
        assert_eq!(
            lines[4],
            powershell.script.lines().next().unwrap_or_default()
        );
    }
}

#[tokio::test]
async fn a_timeout_stops_the_whole_process_group() {
    let harness = Harness::new(Duration::from_secs(2));
    let mut slow = execute("sleep 300 & echo started; sleep 300");
    slow.timeout_ms = 1000;
    let (observer, mut stdout_length) = stdout_watch();
    let script = start_inline(&slow, &harness.placement)
        .await
        .expect("starts");
    let pgid = pgid_of(&script);
    let (_stop, stop_watch) = watch::channel(false);
    let waiting = tokio::spawn(script.wait(stop_watch, observer));

    within(
        LIMIT,
        "the script says it started",
        stdout_length.wait_for(|length| *length > 0),
    )
    .await
    .expect("observer alive");
    let members = live_group_members(pgid);
    assert!(
        members.len() >= 2,
        "the script and its background sleep run: {members:?}"
    );

    let end = within(LIMIT, "timeout", waiting).await.expect("no panic");
    assert_eq!(end.outcome, Outcome::TimedOut);
    // SIGTERM reached every process of the group, so nothing waited out the 2 s grace.
    let took = Duration::from_millis(
        u64::try_from(end.finished_at - end.started_at.expect("started")).expect("positive"),
    );
    assert!(took < Duration::from_millis(2900), "took {took:?}");
    assert_eq!(
        end.message.as_deref(),
        Some("the script ran longer than its timeout of 1s and was stopped")
    );
    // Both sleeps went with the shell: nothing alive is left in the group.
    eventually(LIMIT, "the process group is gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;
    assert!(!group_alive(pgid));
}

#[tokio::test]
async fn cancel_stops_a_script_that_ignores_sigterm() {
    let grace = Duration::from_millis(500);
    let harness = Harness::new(grace);
    // An ignored signal stays ignored across exec, so the sleep ignores SIGTERM too.
    let stubborn = execute("trap '' TERM; sleep 300 & echo ready; sleep 300");
    let (observer, mut stdout_length) = stdout_watch();
    let script = start_inline(&stubborn, &harness.placement)
        .await
        .expect("starts");
    let pgid = pgid_of(&script);
    let (stop, stop_watch) = watch::channel(false);
    let waiting = tokio::spawn(script.wait(stop_watch, observer));
    within(
        LIMIT,
        "the script says it is ready",
        stdout_length.wait_for(|length| *length > 0),
    )
    .await
    .expect("observer alive");

    let canceled_at = Instant::now();
    stop.send_replace(true);
    let end = within(LIMIT, "cancel", waiting).await.expect("no panic");
    assert_eq!(end.outcome, Outcome::Canceled);
    assert_eq!(end.exit_code, Some(137), "SIGKILL after the grace");
    assert!(
        canceled_at.elapsed() >= grace,
        "SIGTERM was given its grace first"
    );
    eventually(LIMIT, "the process group is gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn leftovers_do_not_hold_up_a_finished_script() {
    let harness = Harness::new(Duration::from_secs(2));
    let script = start_inline(
        &execute("sleep 300 & echo main is done"),
        &harness.placement,
    )
    .await
    .expect("starts");
    let pgid = pgid_of(&script);
    let (_stop, stop_watch) = watch::channel(false);
    let began = Instant::now();
    let end = within(LIMIT, "execution", script.wait(stop_watch, ignore())).await;
    assert_eq!(end.outcome, Outcome::Succeeded);
    assert_eq!(harness.stdout(), b"main is done\n");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "the background sleep took SIGTERM at once: {:?}",
        began.elapsed()
    );
    eventually(LIMIT, "the background sleep is gone", || {
        live_group_members(pgid).is_empty()
    })
    .await;
}

#[tokio::test]
async fn output_is_announced_as_it_is_appended() {
    let harness = Harness::new(Duration::from_secs(1));
    let lengths = Arc::new(Mutex::new(Vec::new()));
    let recorded = lengths.clone();
    let observer: OutputObserver = Arc::new(move |stream, length| {
        recorded
            .lock()
            .expect("not poisoned")
            .push((stream, length));
    });
    let (_stop, stop_watch) = watch::channel(false);
    let end = within(
        LIMIT,
        "execution",
        run(
            &execute("echo a; sleep 0.1; echo bc >&2"),
            &harness.placement,
            stop_watch,
            observer,
        ),
    )
    .await;
    assert_eq!(end.outcome, Outcome::Succeeded);
    let lengths = lengths.lock().expect("not poisoned").clone();
    assert_eq!(lengths, vec![(Stream::Stdout, 2), (Stream::Stderr, 3)]);
}
