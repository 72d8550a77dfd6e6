//! Persistence: the `Store` trait every backend implements, its SQLite implementation (the
//! embedded default), and the local blob directory that keeps execution output.

mod blobs;
mod records;
mod sqlite;

pub use blobs::LocalBlobs;
pub use records::{
    CancelOutcome, Change, ExecutionRecord, ExecutionUpdate, Finish, MachineRecord, NewExecution,
    NewMachine, NewRun, Outcome, RunCommandRecord, RunRecord, TokenKind, TokenRecord,
};
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use domain::{ExecutionId, MachineId, RunId, UnixMillis};

/// What can go wrong in a store. Callers match on the first variants; `Database` and `Corrupt`
/// are internal errors that must not leak to API clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a machine named `{0}` is already enrolled")]
    NameTaken(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything the server keeps, behind one interface so that SQLite and PostgreSQL can both
/// serve it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn insert_token(
        &self,
        hash: &str,
        kind: TokenKind,
        machine_id: Option<MachineId>,
        now: UnixMillis,
    ) -> Result<()>;
    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>>;

    /// Enrolls a machine and stores its token, in one transaction.
    async fn enroll_machine(&self, machine: &NewMachine, token_hash: &str) -> Result<()>;
    /// Records what an agent said of its machine when it connected.
    async fn update_machine_facts(&self, machine: &MachineRecord) -> Result<()>;
    async fn set_last_seen(&self, id: MachineId, at: UnixMillis) -> Result<()>;
    async fn list_machines(&self) -> Result<Vec<MachineRecord>>;
    async fn get_machine(&self, id: MachineId) -> Result<Option<MachineRecord>>;
    async fn find_machine_by_name(&self, name: &str) -> Result<Option<MachineRecord>>;
    /// Deletes a machine and its tokens; its unfinished executions end as failed.
    async fn delete_machine(&self, id: MachineId, now: UnixMillis) -> Result<Outcome>;

    /// Creates a run and all its executions, in one transaction. `released` in the outcome
    /// are the executions to send now.
    async fn create_run(&self, run: &NewRun, executions: &[NewExecution]) -> Result<Outcome>;
    /// Creates a run (as `create_run`) and points the named run command at it, creating or
    /// replacing the name, in one transaction.
    async fn put_run_command(
        &self,
        command: &RunCommandRecord,
        run: &NewRun,
        executions: &[NewExecution],
    ) -> Result<Outcome>;
    /// The executions on `machine` of runs made for the named run command `name` (now or
    /// before it was deleted) that have not ended.
    async fn open_run_command_executions(
        &self,
        machine: MachineId,
        name: &str,
    ) -> Result<Vec<ExecutionRecord>>;
    async fn get_run_command(
        &self,
        machine: MachineId,
        name: &str,
    ) -> Result<Option<RunCommandRecord>>;
    /// A machine's run commands, by name.
    async fn list_run_commands(&self, machine: MachineId) -> Result<Vec<RunCommandRecord>>;
    /// Removes the name; its runs stay in the history. False when there was no such name.
    async fn delete_run_command(&self, machine: MachineId, name: &str) -> Result<bool>;
    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>>;
    /// A run without its counts (which cost a pass over its executions): for delivering it.
    async fn get_run_spec(&self, id: RunId) -> Result<Option<RunRecord>>;
    /// Newest first, older than `before` when given.
    async fn list_runs(&self, before: Option<RunId>, limit: u32) -> Result<Vec<RunRecord>>;
    async fn run_executions(&self, id: RunId) -> Result<Vec<ExecutionRecord>>;
    async fn get_execution(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>>;
    /// The machine's executions that are not terminal yet and were released to it.
    async fn open_executions(&self, machine: MachineId) -> Result<Vec<ExecutionRecord>>;

    /// Applies state changes in one transaction (group commit: callers batch them). A change
    /// that would move an execution backwards, out of a terminal state, or that names another
    /// machine's execution, is skipped. Rate-limited runs are advanced in the same transaction.
    async fn apply(&self, updates: &[ExecutionUpdate], now: UnixMillis) -> Result<Outcome>;
    /// Marks a run canceled: its pending executions end as skipped; its delivered and running
    /// ones are flagged so the agents can be told.
    async fn cancel_run(&self, id: RunId, now: UnixMillis) -> Result<CancelOutcome>;
    /// The earliest delivery deadline of a pending execution.
    async fn next_delivery_deadline(&self) -> Result<Option<UnixMillis>>;
    /// Ends every released pending execution whose deadline is at or before `now` as
    /// `delivery_timed_out`.
    async fn expire_deliveries(&self, now: UnixMillis) -> Result<Outcome>;
    /// Runs that still hold back executions, to advance after a restart.
    async fn held_back_runs(&self) -> Result<Vec<RunId>>;
    /// Advances rate-limited runs: releases what their windows allow, or skips the rest when
    /// too many failed.
    async fn advance_runs(&self, runs: &[RunId], now: UnixMillis) -> Result<Outcome>;
}
