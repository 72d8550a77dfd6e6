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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    pub id: RunId,
    pub created_at: UnixMillis,
    pub targets: Targets,
    pub spec: RunSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExecution {
    pub id: ExecutionId,
    pub machine_id: MachineId,
    pub machine_name: String,
    pub delivery_deadline: UnixMillis,
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
}

/// A change to one execution's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionUpdate {
    Delivered {
        id: ExecutionId,
        at: UnixMillis,
    },
    Started {
        id: ExecutionId,
        at: UnixMillis,
    },
    /// The end: `state` must be terminal.
    Finished(Box<Finish>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub id: ExecutionId,
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
}

impl ExecutionUpdate {
    pub fn id(&self) -> ExecutionId {
        match self {
            ExecutionUpdate::Delivered { id, .. } | ExecutionUpdate::Started { id, .. } => *id,
            ExecutionUpdate::Finished(finish) => finish.id,
        }
    }

    pub fn target_state(&self) -> ExecutionState {
        match self {
            ExecutionUpdate::Delivered { .. } => ExecutionState::Delivered,
            ExecutionUpdate::Started { .. } => ExecutionState::Running,
            ExecutionUpdate::Finished(finish) => finish.state,
        }
    }
}

/// What canceling a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelOutcome {
    /// Pending executions that ended as skipped.
    pub skipped: Vec<ExecutionRecord>,
    /// Delivered or running executions whose agents must be told to cancel.
    pub to_cancel: Vec<ExecutionRecord>,
}
