//! Helpers shared by the crate's unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use proto::agent::Execute;
use uuid::Uuid;

/// An `Execute` of `script` with generous limits.
pub(crate) fn execute(script: &str) -> Execute {
    Execute {
        execution_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        script: script.to_string(),
        interpreter: None,
        env: BTreeMap::new(),
        workdir: None,
        timeout_ms: 60_000,
        output_cap_bytes: 1 << 20,
        script_uri: None,
        script_sha256: None,
        max_script_bytes: 1 << 20,
        output_blob_uri: None,
        error_blob_uri: None,
    }
}

/// Awaits `future`, failing the test if it takes longer than `limit`.
pub(crate) async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Polls `condition` until it holds, failing the test after `limit`. Only for conditions no
/// event announces, such as a process disappearing.
pub(crate) async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes of a process group that are alive (zombies excluded), read from /proc
/// independently of the code under test.
pub(crate) fn live_group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    let Ok(listing) = std::fs::read_dir("/proc") else {
        return members;
    };
    for entry in listing.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let (Some(state), Some(group)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        if group.parse() == Ok(pgid) && *state != "Z" && *state != "X" {
            members.push(pid);
        }
    }
    members
}
