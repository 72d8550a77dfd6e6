//! Persistence: the `Store` trait every backend implements, its SQLite implementation (the
//! embedded default), and the local blob directory that keeps execution output.

mod blobs;
mod records;
mod sqlite;

pub use blobs::LocalBlobs;
pub use records::{
    CancelOutcome, ExecutionRecord, ExecutionUpdate, Finish, MachineRecord, NewExecution,
    NewMachine, NewRun, RunRecord, TokenKind, TokenRecord,
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
    /// Deletes a machine and its tokens; its unfinished executions end as failed. Returns the
    /// executions so ended.
    async fn delete_machine(&self, id: MachineId, now: UnixMillis) -> Result<Vec<ExecutionRecord>>;

    /// Creates a run and all its executions, in one transaction.
    async fn create_run(&self, run: &NewRun, executions: &[NewExecution]) -> Result<()>;
    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>>;
    /// Newest first, older than `before` when given.
    async fn list_runs(&self, before: Option<RunId>, limit: u32) -> Result<Vec<RunRecord>>;
    async fn run_executions(&self, id: RunId) -> Result<Vec<ExecutionRecord>>;
    async fn get_execution(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>>;
    /// The machine's executions that are not terminal yet.
    async fn open_executions(&self, machine: MachineId) -> Result<Vec<ExecutionRecord>>;

    /// Applies state changes in one transaction. A change that would move an execution
    /// backwards, or out of a terminal state, is skipped. Returns the executions that changed,
    /// as they are now.
    async fn apply(&self, updates: &[ExecutionUpdate]) -> Result<Vec<ExecutionRecord>>;
    /// Marks a run canceled: its pending executions end as skipped; its delivered and running
    /// ones are flagged so the agents can be told.
    async fn cancel_run(&self, id: RunId, now: UnixMillis) -> Result<CancelOutcome>;
    /// The earliest delivery deadline of a pending execution.
    async fn next_delivery_deadline(&self) -> Result<Option<UnixMillis>>;
    /// Ends every pending execution whose deadline is at or before `now` as
    /// `delivery_timed_out`, and returns them.
    async fn expire_deliveries(&self, now: UnixMillis) -> Result<Vec<ExecutionRecord>>;
}
