//! The rows a store keeps, as plain domain-typed structs.

use domain::{
    ExecutionId, ExecutionState, Labels, MachineId, RunId, RunSpec, StateCounts, Targets,
    UnixMillis,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Full access to the operator API.
    Admin,
    /// May enroll new machines.
    Enroll,
    /// One machine's credential for the agent connection.
    Machine,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Admin => "admin",
            TokenKind::Enroll => "enroll",
            TokenKind::Machine => "machine",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Self> {
        [TokenKind::Admin, TokenKind::Enroll, TokenKind::Machine]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub kind: TokenKind,
    pub machine_id: Option<MachineId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMachine {
    pub id: MachineId,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub enrolled_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    pub id: MachineId,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub agent_version: String,
    pub interpreters: Vec<String>,
    pub enrolled_at: UnixMillis,
    pub last_seen_at: Option<UnixMillis>,
    /// Deleted machines keep their row (and their name in past runs).
    pub deleted_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    pub id: RunId,
    pub created_at: UnixMillis,
    pub targets: Targets,
    pub spec: RunSpec,
}

/// A named run command: the name under a machine, and its latest run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommandRecord {
    pub machine_id: MachineId,
    pub name: String,
    pub run_id: RunId,
    pub async_execution: bool,
    pub treat_failure_as_deployment_failure: bool,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExecution {
    pub id: ExecutionId,
    pub machine_id: MachineId,
    pub machine_name: String,
    pub delivery_deadline: UnixMillis,
    /// Why the machine cannot take it (deleted, ...): the execution is created failed, with
    /// this message, and never sent.
    pub ineligible: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: RunId,
    pub created_at: UnixMillis,
    pub targets: Targets,
    pub spec: RunSpec,
    pub cancel_requested: bool,
    pub counts: StateCounts,
    pub total: u64,
    /// Why rate control stopped sending the rest, if it did.
    pub stop_reason: Option<String>,
    /// When the last execution ended, once all have.
    pub finished_at: Option<UnixMillis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRecord {
    pub id: ExecutionId,
    pub run_id: RunId,
    pub machine_id: MachineId,
    pub machine_name: String,
    pub state: ExecutionState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub created_at: UnixMillis,
    pub delivered_at: Option<UnixMillis>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    pub delivery_deadline: UnixMillis,
    pub cancel_requested: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
    /// Rate control holds it back until a slot frees up.
    pub released: bool,
    /// Why it failed without running, or what went wrong around it (`InterpreterNotFound`,
    /// `ScriptDownloadFailed`, `OutputUploadFailed`, ...).
    pub error_code: Option<String>,
}

/// A change to one execution's state, scoped to a machine when an agent reports it (an agent
/// can only change its own machine's executions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionUpdate {
    pub id: ExecutionId,
    pub machine: Option<MachineId>,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Delivered {
        at: UnixMillis,
    },
    Started {
        at: UnixMillis,
    },
    /// The end: `state` must be terminal.
    Finished(Box<Finish>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub state: ExecutionState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: UnixMillis,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
    pub error_code: Option<String>,
}

impl Change {
    pub fn target_state(&self) -> ExecutionState {
        match self {
            Change::Delivered { .. } => ExecutionState::Delivered,
            Change::Started { .. } => ExecutionState::Running,
            Change::Finished(finish) => finish.state,
        }
    }
}

/// What a write did, beyond itself, for the server to act on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Executions whose state changed, as they are now (including any that rate control
    /// skipped).
    pub changed: Vec<ExecutionRecord>,
    /// Executions that may go to their machines now: every execution of a new run without
    /// `max_concurrency`, else as many as its window allows.
    pub released: Vec<ExecutionRecord>,
    /// Runs whose last execution just ended.
    pub finished_runs: Vec<RunId>,
}

impl Outcome {
    pub(crate) fn absorb(&mut self, other: Outcome) {
        self.changed.extend(other.changed);
        self.released.extend(other.released);
        self.finished_runs.extend(other.finished_runs);
    }
}

/// What canceling a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelOutcome {
    /// Pending executions that ended as skipped, and the run if that ended it.
    pub outcome: Outcome,
    /// Delivered or running executions whose agents must be told to cancel.
    pub to_cancel: Vec<ExecutionRecord>,
}
