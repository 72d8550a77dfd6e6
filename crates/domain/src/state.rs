//! The execution state machine and the run status derived from it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Where one execution (a run on one machine) stands.
///
/// `pending` → `delivered` (the agent has it, durably) → `running` → one terminal state.
/// A state only ever moves forward, possibly skipping steps (a server that restarted may learn
/// of an execution's end before it learned of its start), and terminal states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExecutionState {
    Pending,
    Delivered,
    Running,
    /// Exit code 0.
    Succeeded,
    /// Exit code other than 0, or the script could not be started.
    Failed,
    TimedOut,
    Canceled,
    /// The machine never took the execution before its delivery deadline.
    DeliveryTimedOut,
    /// Never sent: the run was canceled first.
    Skipped,
    /// The agent lost the process (the machine rebooted, the agent's state was wiped): the
    /// outcome is unknown, and said so.
    Interrupted,
}

impl ExecutionState {
    pub const ALL: [ExecutionState; 10] = [
        Self::Pending,
        Self::Delivered,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Canceled,
        Self::DeliveryTimedOut,
        Self::Skipped,
        Self::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Canceled => "canceled",
            Self::DeliveryTimedOut => "delivery_timed_out",
            Self::Skipped => "skipped",
            Self::Interrupted => "interrupted",
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 3
    }

    fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Delivered => 1,
            Self::Running => 2,
            _ => 3,
        }
    }

    /// Whether an execution in `self` may move to `next`.
    pub fn can_become(self, next: ExecutionState) -> bool {
        !self.is_terminal() && next.rank() > self.rank()
    }
}

impl fmt::Display for ExecutionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionState {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("unknown execution state `{text}`"))
    }
}

/// How many executions of a run are in each state.
pub type StateCounts = BTreeMap<ExecutionState, u64>;

/// A run's status, derived from its executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Nothing has reached a machine yet.
    Pending,
    /// Some execution is delivered or running, or some are done and others are not.
    InProgress,
    /// Every execution succeeded.
    Succeeded,
    /// Every execution is terminal and at least one did not succeed.
    Failed,
    /// The run was canceled and every execution is terminal.
    Canceled,
}

impl RunStatus {
    pub fn derive(counts: &StateCounts, cancel_requested: bool) -> Self {
        let count = |state| counts.get(&state).copied().unwrap_or(0);
        let total: u64 = counts.values().sum();
        let terminal: u64 = counts
            .iter()
            .filter(|(state, _)| state.is_terminal())
            .map(|(_, n)| n)
            .sum();
        if terminal < total {
            if count(ExecutionState::Pending) == total {
                Self::Pending
            } else {
                Self::InProgress
            }
        } else if cancel_requested {
            Self::Canceled
        } else if count(ExecutionState::Succeeded) == total {
            Self::Succeeded
        } else {
            Self::Failed
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    pub fn is_done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

#[cfg(test)]
mod tests {
    use super::ExecutionState::*;
    use super::*;

    #[test]
    fn states_only_move_forward_and_terminal_states_never_change() {
        assert!(Pending.can_become(Delivered));
        assert!(Pending.can_become(Running));
        assert!(Pending.can_become(DeliveryTimedOut));
        assert!(Delivered.can_become(Succeeded));
        assert!(Running.can_become(Interrupted));
        assert!(!Running.can_become(Delivered));
        assert!(!Running.can_become(Running));
        for terminal in ExecutionState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for next in ExecutionState::ALL {
                assert!(!terminal.can_become(next), "{terminal} -> {next}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in ExecutionState::ALL {
            assert_eq!(state.as_str().parse::<ExecutionState>(), Ok(state));
        }
    }

    #[test]
    fn run_status() {
        let counts =
            |pairs: &[(ExecutionState, u64)]| pairs.iter().copied().collect::<StateCounts>();
        assert_eq!(
            RunStatus::derive(&counts(&[(Pending, 2)]), false),
            RunStatus::Pending
        );
        assert_eq!(
            RunStatus::derive(&counts(&[(Pending, 1), (Succeeded, 1)]), false),
            RunStatus::InProgress
        );
        assert_eq!(
            RunStatus::derive(&counts(&[(Succeeded, 2)]), false),
            RunStatus::Succeeded
        );
        assert_eq!(
            RunStatus::derive(&counts(&[(Succeeded, 1), (Failed, 1)]), false),
            RunStatus::Failed
        );
        assert_eq!(
            RunStatus::derive(&counts(&[(Canceled, 1), (Skipped, 1)]), true),
            RunStatus::Canceled
        );
    }
}
