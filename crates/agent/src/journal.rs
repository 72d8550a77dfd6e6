//! The agent's durable record of every execution it accepted, kept until the server acknowledges
//! the result: `<state_dir>/journal/<execution_id>/{execute.msgpack,status.json,stdout,stderr}`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use proto::agent::{Execute, HeldPhase, Outcome, Stream};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const EXECUTE_FILE: &str = "execute.msgpack";
const STATUS_FILE: &str = "status.json";
const STDOUT_FILE: &str = "stdout";
const STDERR_FILE: &str = "stderr";
/// Entries are assembled under this prefix and renamed into place, so a half-written entry is
/// never mistaken for an accepted execution.
const NEW_ENTRY_PREFIX: &str = ".new-";

/// What went wrong with a journal operation.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    #[error("execution {0} is already in the journal")]
    AlreadyHeld(Uuid),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> JournalError {
    let context = context.into();
    move |source| JournalError::Io { context, source }
}

/// `status.json`: where an execution is in its life, and how it ended once it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) phase: HeldPhase,
    #[serde(default)]
    pub(crate) pid: Option<u32>,
    #[serde(default)]
    pub(crate) started_at: Option<i64>,
    /// The kernel's boot id when the script started: after a reboot its pid means nothing.
    #[serde(default)]
    pub(crate) boot_id: Option<String>,
    #[serde(default)]
    pub(crate) outcome: Option<Outcome>,
    #[serde(default)]
    pub(crate) exit_code: Option<i32>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) finished_at: Option<i64>,
    #[serde(default)]
    pub(crate) stdout_bytes: u64,
    #[serde(default)]
    pub(crate) stderr_bytes: u64,
    #[serde(default)]
    pub(crate) stdout_dropped: u64,
    #[serde(default)]
    pub(crate) stderr_dropped: u64,
    /// `Finished.error_code`.
    #[serde(default)]
    pub(crate) error_code: Option<String>,
    /// Streams still to upload to their blob URIs. While the phase is `Running` and an outcome
    /// is recorded, the script is over and only these uploads remain: a restarted agent
    /// finishes them instead of calling the execution interrupted.
    #[serde(default)]
    pub(crate) pending_uploads: Vec<Stream>,
}

impl Status {
    pub(crate) fn queued() -> Self {
        Self {
            phase: HeldPhase::Queued,
            pid: None,
            started_at: None,
            boot_id: None,
            outcome: None,
            exit_code: None,
            message: None,
            finished_at: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
            stdout_dropped: 0,
            stderr_dropped: 0,
            error_code: None,
            pending_uploads: Vec::new(),
        }
    }

    /// Whether the script is over and only the uploads of its output remain.
    pub(crate) fn is_uploading(&self) -> bool {
        self.phase == HeldPhase::Running && self.outcome.is_some()
    }

    /// The result as the protocol sends it, once the execution is finished.
    pub(crate) fn finished(&self, execution_id: Uuid) -> Option<proto::agent::Finished> {
        if self.phase != HeldPhase::Finished {
            return None;
        }
        Some(self.result(execution_id))
    }

    /// The result recorded so far (for an execution that is uploading its output, the result
    /// before the uploads).
    pub(crate) fn result(&self, execution_id: Uuid) -> proto::agent::Finished {
        proto::agent::Finished {
            execution_id,
            outcome: self.outcome.unwrap_or(Outcome::Interrupted),
            exit_code: self.exit_code,
            message: self.message.clone(),
            started_at: self.started_at,
            finished_at: self.finished_at.unwrap_or_default(),
            stdout_bytes: self.stdout_bytes,
            stderr_bytes: self.stderr_bytes,
            stdout_dropped: self.stdout_dropped,
            stderr_dropped: self.stderr_dropped,
            error_code: self.error_code.clone(),
        }
    }

    pub(crate) fn set_finished(&mut self, finished: &proto::agent::Finished) {
        self.set_result(finished);
        self.phase = HeldPhase::Finished;
        self.pending_uploads.clear();
    }

    /// Records how the script ended, keeping the phase: with `pending_uploads` set and the
    /// phase `Running`, the execution is uploading its output.
    pub(crate) fn set_result(&mut self, finished: &proto::agent::Finished) {
        self.outcome = Some(finished.outcome);
        self.exit_code = finished.exit_code;
        self.message = finished.message.clone();
        self.started_at = finished.started_at;
        self.finished_at = Some(finished.finished_at);
        self.stdout_bytes = finished.stdout_bytes;
        self.stderr_bytes = finished.stderr_bytes;
        self.stdout_dropped = finished.stdout_dropped;
        self.stderr_dropped = finished.stderr_dropped;
        self.error_code = finished.error_code.clone();
    }
}

/// The files an execution's output is appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OutputPaths {
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
}

/// One entry found when loading the journal.
#[derive(Debug, Clone)]
pub(crate) struct LoadedEntry {
    pub(crate) execution_id: Uuid,
    pub(crate) status: Status,
    /// Bytes in the output files now.
    pub(crate) stdout_len: u64,
    pub(crate) stderr_len: u64,
}

/// The journal directory. Cheap to clone; every method is blocking file I/O, so async callers
/// run them on the blocking pool.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    root: PathBuf,
}

impl Journal {
    /// Opens (creating if needed) `<state_dir>/journal`.
    pub(crate) fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let root = state_dir.join("journal");
        fs::create_dir_all(&root).map_err(io_error(format!("creating {}", root.display())))?;
        Ok(Self { root })
    }

    fn entry_dir(&self, execution_id: Uuid) -> PathBuf {
        self.root.join(execution_id.to_string())
    }

    pub(crate) fn output_paths(&self, execution_id: Uuid) -> OutputPaths {
        let dir = self.entry_dir(execution_id);
        OutputPaths {
            stdout: dir.join(STDOUT_FILE),
            stderr: dir.join(STDERR_FILE),
        }
    }

    /// Records a newly accepted execution durably: once this returns, the entry survives a crash
    /// or power loss, and until then it does not exist at all.
    pub(crate) fn create(&self, execute: &Execute) -> Result<(), JournalError> {
        let execution_id = execute.execution_id;
        let final_dir = self.entry_dir(execution_id);
        if final_dir.exists() {
            return Err(JournalError::AlreadyHeld(execution_id));
        }
        let new_dir = self.root.join(format!("{NEW_ENTRY_PREFIX}{execution_id}"));
        if new_dir.exists() {
            fs::remove_dir_all(&new_dir)
                .map_err(io_error(format!("removing {}", new_dir.display())))?;
        }
        fs::create_dir(&new_dir).map_err(io_error(format!("creating {}", new_dir.display())))?;
        write_synced(&new_dir.join(EXECUTE_FILE), &proto::agent::encode(execute))?;
        write_synced(&new_dir.join(STATUS_FILE), &status_json(&Status::queued())?)?;
        write_synced(&new_dir.join(STDOUT_FILE), b"")?;
        write_synced(&new_dir.join(STDERR_FILE), b"")?;
        sync_dir(&new_dir)?;
        fs::rename(&new_dir, &final_dir).map_err(io_error(format!(
            "renaming {} into place",
            new_dir.display()
        )))?;
        sync_dir(&self.root)
    }

    pub(crate) fn read_execute(&self, execution_id: Uuid) -> Result<Execute, JournalError> {
        let path = self.entry_dir(execution_id).join(EXECUTE_FILE);
        let bytes = fs::read(&path).map_err(io_error(format!("reading {}", path.display())))?;
        proto::agent::decode(&bytes).map_err(|error| JournalError::Corrupt {
            path,
            message: error.to_string(),
        })
    }

    pub(crate) fn read_status(&self, execution_id: Uuid) -> Result<Status, JournalError> {
        let path = self.entry_dir(execution_id).join(STATUS_FILE);
        let bytes = fs::read(&path).map_err(io_error(format!("reading {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|error| JournalError::Corrupt {
            path,
            message: error.to_string(),
        })
    }

    /// Replaces `status.json` atomically (write a temporary file, fsync, rename, fsync the
    /// directory), so a crash leaves either the old status or the new one.
    pub(crate) fn write_status(
        &self,
        execution_id: Uuid,
        status: &Status,
    ) -> Result<(), JournalError> {
        let dir = self.entry_dir(execution_id);
        let temporary = dir.join(format!("{STATUS_FILE}.tmp"));
        write_synced(&temporary, &status_json(status)?)?;
        fs::rename(&temporary, dir.join(STATUS_FILE))
            .map_err(io_error(format!("replacing the status of {execution_id}")))?;
        sync_dir(&dir)
    }

    /// Forgets an execution. Removing an entry that is already gone is not an error.
    pub(crate) fn remove(&self, execution_id: Uuid) -> Result<(), JournalError> {
        let dir = self.entry_dir(execution_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(format!("removing {}", dir.display()))(error)),
        }
    }

    /// Every readable entry, oldest first (execution ids are UUIDv7). Unreadable entries are
    /// logged and skipped: one corrupt file must not stop the agent from serving the rest.
    pub(crate) fn load(&self) -> Result<Vec<LoadedEntry>, JournalError> {
        let listing = fs::read_dir(&self.root)
            .map_err(io_error(format!("listing {}", self.root.display())))?;
        let mut entries = Vec::new();
        for item in listing {
            let item = match item {
                Ok(item) => item,
                Err(error) => {
                    tracing::warn!(%error, "skipping an unreadable journal entry");
                    continue;
                }
            };
            let name = item.file_name().to_string_lossy().into_owned();
            if name.starts_with(NEW_ENTRY_PREFIX) {
                // An entry that was never renamed into place was never accepted.
                if let Err(error) = fs::remove_dir_all(item.path()) {
                    tracing::warn!(%error, entry = %name, "could not remove a half-written journal entry");
                }
                continue;
            }
            let Ok(execution_id) = name.parse::<Uuid>() else {
                tracing::warn!(entry = %name, "skipping a journal entry that is not an execution id");
                continue;
            };
            match self.load_entry(execution_id) {
                Ok(entry) => entries.push(entry),
                Err(error) => {
                    tracing::warn!(%error, %execution_id, "skipping an unreadable journal entry");
                }
            }
        }
        entries.sort_by_key(|entry| entry.execution_id);
        Ok(entries)
    }

    fn load_entry(&self, execution_id: Uuid) -> Result<LoadedEntry, JournalError> {
        let status = self.read_status(execution_id)?;
        if status.phase == HeldPhase::Queued {
            // A queued entry is run from its Execute, so that must be readable now.
            self.read_execute(execution_id)?;
        }
        let paths = self.output_paths(execution_id);
        Ok(LoadedEntry {
            execution_id,
            status,
            stdout_len: file_len(&paths.stdout)?,
            stderr_len: file_len(&paths.stderr)?,
        })
    }
}

/// The kernel's id for this boot, when it can be read.
pub(crate) fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
}

fn file_len(path: &Path) -> Result<u64, JournalError> {
    match fs::metadata(path) {
        Ok(metadata) => Ok(metadata.len()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(error) => Err(io_error(format!("reading {}", path.display()))(error)),
    }
}

fn status_json(status: &Status) -> Result<Vec<u8>, JournalError> {
    serde_json::to_vec_pretty(status).map_err(|error| JournalError::Corrupt {
        path: PathBuf::from(STATUS_FILE),
        message: error.to_string(),
    })
}

fn write_synced(path: &Path, contents: &[u8]) -> Result<(), JournalError> {
    let context = || format!("writing {}", path.display());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_error(context()))?;
    file.write_all(contents).map_err(io_error(context()))?;
    file.sync_all().map_err(io_error(context()))
}

fn sync_dir(path: &Path) -> Result<(), JournalError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(format!("syncing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::execute;

    #[test]
    fn entries_round_trip() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(state.path()).expect("journal opens");
        let first = execute("echo one");
        let second = execute("echo two");
        journal.create(&second).expect("created");
        journal.create(&first).expect("created");
        assert!(matches!(
            journal.create(&first),
            Err(JournalError::AlreadyHeld(_))
        ));

        assert_eq!(
            journal.read_execute(first.execution_id).expect("reads"),
            first
        );
        assert_eq!(
            journal.read_status(first.execution_id).expect("reads"),
            Status::queued()
        );

        let mut status = Status::queued();
        status.phase = HeldPhase::Running;
        status.pid = Some(42);
        status.started_at = Some(1_000);
        journal
            .write_status(second.execution_id, &status)
            .expect("written");
        fs::write(journal.output_paths(second.execution_id).stdout, b"abc").expect("output");

        let loaded = journal.load().expect("loads");
        let ids: Vec<Uuid> = loaded.iter().map(|entry| entry.execution_id).collect();
        assert_eq!(
            ids,
            vec![first.execution_id, second.execution_id],
            "oldest first"
        );
        assert_eq!(loaded[1].status, status);
        assert_eq!((loaded[1].stdout_len, loaded[1].stderr_len), (3, 0));

        journal.remove(first.execution_id).expect("removed");
        journal
            .remove(first.execution_id)
            .expect("removing twice is fine");
        assert!(!journal.entry_dir(first.execution_id).exists());
        assert_eq!(journal.load().expect("loads").len(), 1);
    }

    #[test]
    fn unreadable_entries_are_skipped() {
        let state = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(state.path()).expect("journal opens");
        let good = execute("true");
        journal.create(&good).expect("created");
        let broken = execute("true");
        journal.create(&broken).expect("created");
        fs::write(
            journal.entry_dir(broken.execution_id).join(STATUS_FILE),
            b"{not json",
        )
        .expect("corrupted");
        let unreadable_execute = execute("true");
        journal.create(&unreadable_execute).expect("created");
        fs::write(
            journal
                .entry_dir(unreadable_execute.execution_id)
                .join(EXECUTE_FILE),
            b"\xc1",
        )
        .expect("corrupted");
        fs::create_dir(journal.root.join("not-an-id")).expect("stray dir");
        fs::create_dir(
            journal
                .root
                .join(format!("{NEW_ENTRY_PREFIX}{}", Uuid::now_v7())),
        )
        .expect("half-written entry");

        let loaded = journal.load().expect("loads");
        let ids: Vec<Uuid> = loaded.iter().map(|entry| entry.execution_id).collect();
        assert_eq!(ids, vec![good.execution_id]);
        let leftovers = fs::read_dir(&journal.root)
            .expect("lists")
            .filter_map(Result::ok)
            .filter(|item| {
                item.file_name()
                    .to_string_lossy()
                    .starts_with(NEW_ENTRY_PREFIX)
            })
            .count();
        assert_eq!(leftovers, 0, "half-written entries are cleaned up");
    }
}
