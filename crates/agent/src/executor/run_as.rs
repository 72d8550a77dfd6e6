//! Running a script as another user: the user is looked up before the spawn, and the child
//! drops to it (supplementary groups, then group, then user) between fork and exec.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

use nix::unistd::{Gid, Uid, User, geteuid, getgrouplist, setgid, setgroups, setsid, setuid};
use tokio::process::Command;

use super::{ErrorCode, ExecutionEnd};

/// The user a script runs as, resolved on this machine.
#[derive(Debug, Clone)]
pub(crate) struct RunAs {
    pub(crate) name: String,
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
    pub(crate) home: PathBuf,
    pub(crate) shell: PathBuf,
    groups: Vec<Gid>,
}

/// Where scripts run as other users get their directories: `<tmp>/fleetrun-run-as`, owned by
/// the agent's user (root), which only it may write in and anyone may pass through (0711).
/// One that exists but is not that is refused: someone else could swap what is inside.
pub(crate) fn work_root() -> io::Result<PathBuf> {
    let root = std::env::temp_dir().join("fleetrun-run-as");
    match fs::DirBuilder::new().mode(0o711).create(&root) {
        Ok(()) => fs::set_permissions(&root, fs::Permissions::from_mode(0o711))?,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let found = fs::symlink_metadata(&root)?;
    let safe = found.is_dir() && found.uid() == geteuid().as_raw() && found.mode() & 0o022 == 0;
    if !safe {
        return Err(io::Error::other(format!(
            "{} is not a directory of the agent's user that only it may write in",
            root.display()
        )));
    }
    Ok(root)
}

/// The directory a script run as another user had: removed with its journal entry.
pub(crate) fn work_dir_of(execution_id: uuid::Uuid) -> PathBuf {
    std::env::temp_dir()
        .join("fleetrun-run-as")
        .join(execution_id.to_string())
}

/// Looks `user` (a name or a numeric uid) up. `None` when the agent already runs as that
/// user, so nothing has to change. Only root may switch to someone else.
pub(crate) fn resolve(user: &str) -> Result<Option<RunAs>, ExecutionEnd> {
    let found = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(user),
    };
    let account = match found {
        Ok(Some(account)) => account,
        Ok(None) => {
            return Err(ExecutionEnd::failed(
                ErrorCode::RunAsUserNotFound,
                format!("run_as_user `{user}` does not exist on this machine"),
            ));
        }
        Err(error) => {
            return Err(ExecutionEnd::failed(
                ErrorCode::RunAsUserNotFound,
                format!("could not look up run_as_user `{user}`: {error}"),
            ));
        }
    };
    let agent_uid = geteuid();
    if account.uid == agent_uid {
        return Ok(None);
    }
    if !agent_uid.is_root() {
        return Err(ExecutionEnd::failed(
            ErrorCode::RunAsNotPermitted,
            format!(
                "the agent runs as uid {agent_uid}, not root, so it cannot run a script as \
                 `{}`; run the agent as root to use run_as_user",
                account.name
            ),
        ));
    }
    let groups = CString::new(account.name.clone())
        .map_err(io::Error::other)
        .and_then(|name| getgrouplist(&name, account.gid).map_err(io::Error::from))
        .map_err(|error| {
            ExecutionEnd::failed(
                ErrorCode::RunAsUserNotFound,
                format!(
                    "could not read the groups of run_as_user `{}`: {error}",
                    account.name
                ),
            )
        })?;
    Ok(Some(RunAs {
        name: account.name,
        uid: account.uid,
        gid: account.gid,
        home: account.dir,
        shell: account.shell,
        groups,
    }))
}

/// Makes `command`'s child lead a session (and so a process group) of its own, away from
/// the agent's terminal, and drop to `run_as` before it execs.
pub(crate) fn apply(command: &mut Command, run_as: &RunAs) {
    let (uid, gid, groups) = (run_as.uid, run_as.gid, run_as.groups.clone());
    let drop_privileges = move || -> io::Result<()> {
        setsid()?;
        // Groups first: once the uid is not root, neither groups nor gid can change.
        setgroups(&groups)?;
        setgid(gid)?;
        setuid(uid)?;
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe work is allowed. It makes four system calls on values resolved
    // before the fork and neither allocates nor takes a lock: `setgroups` passes the slice's
    // pointer straight to libc, and errors become `io::Error` from a plain errno.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(drop_privileges);
    }
}
