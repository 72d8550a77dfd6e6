//! The SQLite store: one file in WAL mode, a single writer connection (SQLite takes one writer
//! at a time anyway, and a single connection never waits on its own lock) and a small pool of
//! readers.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use domain::{
    ExecutionId, ExecutionState, Interpreter, Labels, MachineId, RateLimit, RunId, RunProgress,
    RunSpec, RunStep, Selector, StateCounts, Targets, UnixMillis, is_error, next_step,
    validate_interpreter,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use crate::records::*;
use crate::{Result, Store, StoreError};

/// Each entry moves the schema one version forward; `PRAGMA user_version` records how far a
/// database has come. Never edit an entry that has shipped: add one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    machine_id TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX tokens_machine ON tokens(machine_id);
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
    labels TEXT NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    arch TEXT NOT NULL,
    agent_version TEXT NOT NULL DEFAULT '',
    interpreters TEXT NOT NULL DEFAULT '[]',
        enrolled_at INTEGER NOT NULL,
    last_seen_at INTEGER,
    deleted_at INTEGER
);
-- Names are unique among live machines; a deleted machine keeps its row, so that a run naming
-- it gets a failed execution that says so, and its name can be enrolled again.
CREATE UNIQUE INDEX machines_live_name ON machines(name) WHERE deleted_at IS NULL;
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    targets_kind TEXT NOT NULL,
    targets_value TEXT NOT NULL,
    script TEXT NOT NULL,
    interpreter TEXT,
    parameters TEXT NOT NULL,
    env TEXT NOT NULL,
    workdir TEXT,
    timeout_ms INTEGER NOT NULL,
    delivery_timeout_ms INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    max_concurrency TEXT,
        max_errors TEXT,
    stop_reason TEXT,
    script_uri TEXT,
    script_sha256 TEXT,
    output_blob_uri TEXT,
    error_blob_uri TEXT
);
CREATE TABLE executions (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id),
    machine_id TEXT NOT NULL,
    machine_name TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    message TEXT,
    created_at INTEGER NOT NULL,
    delivered_at INTEGER,
    started_at INTEGER,
    finished_at INTEGER,
    delivery_deadline INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    stdout_dropped INTEGER NOT NULL DEFAULT 0,
    stderr_dropped INTEGER NOT NULL DEFAULT 0,
    stdout_tail BLOB NOT NULL DEFAULT x'',
    stderr_tail BLOB NOT NULL DEFAULT x'',
        released INTEGER NOT NULL DEFAULT 1,
    error_code TEXT
);
CREATE INDEX executions_run ON executions(run_id);
CREATE INDEX executions_run_open ON executions(run_id)
    WHERE state IN ('pending', 'delivered', 'running');
CREATE INDEX executions_machine_open ON executions(machine_id)
    WHERE state IN ('pending', 'delivered', 'running');
CREATE INDEX executions_pending_deadline ON executions(delivery_deadline)
    WHERE state = 'pending';
"#,
    r#"
ALTER TABLE runs ADD COLUMN protected_parameters TEXT NOT NULL DEFAULT '{}';
ALTER TABLE runs ADD COLUMN run_as_user TEXT;
ALTER TABLE runs ADD COLUMN replaces TEXT NOT NULL DEFAULT '[]';
-- The named run command a run was made for, if any: its open executions are what the next run
-- of the name must stop first.
ALTER TABLE runs ADD COLUMN run_command TEXT COLLATE NOCASE;
CREATE INDEX runs_run_command ON runs(run_command) WHERE run_command IS NOT NULL;
-- Named run commands (`machines/{m}/run-commands/{name}`): a name for the latest of a series of
-- runs on one machine. The runs keep the script and its settings; earlier ones stay in the
-- history.
CREATE TABLE run_commands (
    machine_id TEXT NOT NULL,
    -- Azure's resource names are case-insensitive: `Deploy` and `deploy` are one command.
    name TEXT NOT NULL COLLATE NOCASE,
    run_id TEXT NOT NULL REFERENCES runs(id),
    async_execution INTEGER NOT NULL,
    treat_failure_as_deployment_failure INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (machine_id, name)
);
"#,
];

const EXECUTION_COLUMNS: &str = "id, run_id, machine_id, machine_name, state, exit_code, message, \
    created_at, delivered_at, started_at, finished_at, delivery_deadline, cancel_requested, \
    stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped, stdout_tail, stderr_tail, released, error_code";

/// `EXECUTION_COLUMNS`, qualified for statements that join another table.
const RETURNED_COLUMNS: &str = "executions.id AS id, run_id, machine_id, machine_name, state, exit_code, message, \
    created_at, delivered_at, started_at, finished_at, delivery_deadline, cancel_requested, \
    stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped, stdout_tail, stderr_tail, released, \
    error_code";

const RUN_COLUMNS: &str = "id, created_at, targets_kind, targets_value, script, interpreter, \
    parameters, env, workdir, timeout_ms, delivery_timeout_ms, cancel_requested, \
    max_concurrency, max_errors, stop_reason, script_uri, script_sha256, output_blob_uri, \
    error_blob_uri, protected_parameters, run_as_user, replaces";

const RUN_COMMAND_COLUMNS: &str = "machine_id, name, run_id, async_execution, \
    treat_failure_as_deployment_failure, created_at, updated_at";

const MACHINE_COLUMNS: &str = "id, name, labels, hostname, os, arch, agent_version, interpreters, enrolled_at, last_seen_at, \
     deleted_at";

pub struct SqliteStore {
    writer: SqlitePool,
    readers: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a crash of the process (kill -9) without losing a
            // committed transaction; only a power loss may lose the last few.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        migrate(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, readers })
    }

    async fn counts_for(
        &self,
        run_ids: &[String],
    ) -> Result<BTreeMap<String, (StateCounts, Option<i64>)>> {
        let mut result: BTreeMap<String, (StateCounts, Option<i64>)> = BTreeMap::new();
        if run_ids.is_empty() {
            return Ok(result);
        }
        let placeholders = vec!["?"; run_ids.len()].join(",");
        let sql = format!(
            "SELECT run_id, state, COUNT(*) AS n, MAX(finished_at) AS last FROM executions \
             WHERE run_id IN ({placeholders}) GROUP BY run_id, state"
        );
        let mut query = sqlx::query(&sql);
        for id in run_ids {
            query = query.bind(id);
        }
        for row in query.fetch_all(&self.readers).await? {
            let run_id: String = row.try_get("run_id")?;
            let state = parse_state(&row.try_get::<String, _>("state")?)?;
            let n: i64 = row.try_get("n")?;
            let last: Option<i64> = row.try_get("last")?;
            let entry = result.entry(run_id).or_default();
            entry.0.insert(state, n as u64);
            entry.1 = entry.1.max(last);
        }
        Ok(result)
    }

    async fn runs_with_counts(&self, rows: Vec<SqliteRow>) -> Result<Vec<RunRecord>> {
        let ids: Vec<String> = rows
            .iter()
            .map(|row| row.try_get("id"))
            .collect::<std::result::Result<_, _>>()?;
        let mut counts = self.counts_for(&ids).await?;
        rows.into_iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let (state_counts, last) = counts.remove(&id).unwrap_or_default();
                run_from_row(&row, state_counts, last)
            })
            .collect()
    }

    async fn executions_where(&self, clause: &str, bind: &str) -> Result<Vec<ExecutionRecord>> {
        let sql = format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE {clause} ORDER BY machine_name, id"
        );
        sqlx::query(&sql)
            .bind(bind)
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(execution_from_row)
            .collect()
    }
}

/// Inserts a run and its executions in `tx`. `released` in the outcome are the executions to
/// send once it commits.
async fn insert_run(
    tx: &mut Transaction<'_, Sqlite>,
    run: &NewRun,
    executions: &[NewExecution],
) -> Result<Outcome> {
    let run_id = run.id.to_string();
    let (targets_kind, targets_value) = targets_to_columns(&run.targets);
    // With a concurrency window, executions start held back and are released by `settle`;
    // their delivery deadline starts when they are released.
    let held_back = run.spec.max_concurrency.is_some();
    sqlx::query(&format!(
            "INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&run_id)
        .bind(run.created_at)
        .bind(targets_kind)
        .bind(targets_value)
        .bind(&run.spec.script)
        .bind(run.spec.interpreter.as_ref().map(|i| i.as_str().to_string()))
        .bind(to_json(&run.spec.parameters))
        .bind(to_json(&run.spec.env))
        .bind(&run.spec.workdir)
        .bind(run.spec.timeout.as_millis() as i64)
        .bind(run.spec.delivery_timeout.as_millis() as i64)
        .bind(run.spec.max_concurrency.map(|limit| limit.to_string()))
        .bind(run.spec.max_errors.map(|limit| limit.to_string()))
        .bind(&run.spec.script_uri)
        .bind(&run.spec.script_sha256)
        .bind(&run.spec.output_blob_uri)
        .bind(&run.spec.error_blob_uri)
        .bind(to_json(&run.spec.protected_parameters))
        .bind(&run.spec.run_as_user)
        .bind(to_json(
            &run.spec
                .replaces
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        ))
        .execute(&mut **tx)
        .await?;
    // Many rows per statement: a fan-out to thousands of machines is a few statements.
    let mut released = Vec::new();
    let mut ineligible = Vec::new();
    for chunk in executions.chunks(100) {
        let values = vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO executions (id, run_id, machine_id, machine_name, state, created_at, \
                 delivery_deadline, released, message, finished_at) VALUES {values} \
                 RETURNING {EXECUTION_COLUMNS}"
        );
        let mut query = sqlx::query(&sql);
        for execution in chunk {
            query = query
                .bind(execution.id.to_string())
                .bind(&run_id)
                .bind(execution.machine_id.to_string())
                .bind(&execution.machine_name)
                .bind(if execution.ineligible.is_some() {
                    "failed"
                } else {
                    "pending"
                })
                .bind(run.created_at)
                .bind(if held_back {
                    i64::MAX
                } else {
                    execution.delivery_deadline
                })
                .bind((!held_back || execution.ineligible.is_some()) as i64)
                .bind(&execution.ineligible)
                .bind(execution.ineligible.as_ref().map(|_| run.created_at));
        }
        for row in query.fetch_all(&mut **tx).await? {
            let execution = execution_from_row(&row)?;
            if execution.state == ExecutionState::Pending && execution.released {
                released.push(execution);
            } else if execution.state.is_terminal() {
                ineligible.push(execution);
            }
        }
    }
    let mut outcome = Outcome {
        released,
        ..Outcome::default()
    };
    if !ineligible.is_empty() {
        // Ineligible targets count as failures for max_errors, may be all there is, and
        // settling them advances a rate-limited run too.
        outcome.absorb(settle(tx, ineligible, run.created_at).await?);
    } else if held_back {
        outcome.absorb(advance(tx, &[run.id], run.created_at).await?);
    }
    Ok(outcome)
}

fn run_command_from_row(row: &SqliteRow) -> Result<RunCommandRecord> {
    Ok(RunCommandRecord {
        machine_id: parse_id(&row.try_get::<String, _>("machine_id")?)?,
        name: row.try_get("name")?,
        run_id: parse_id(&row.try_get::<String, _>("run_id")?)?,
        async_execution: row.try_get::<i64, _>("async_execution")? != 0,
        treat_failure_as_deployment_failure: row
            .try_get::<i64, _>("treat_failure_as_deployment_failure")?
            != 0,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

async fn migrate(pool: &SqlitePool) -> Result<()> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(migration).execute(&mut *tx).await?;
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", index + 1))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse_state(text: &str) -> Result<ExecutionState> {
    ExecutionState::from_str(text).map_err(corrupt)
}

fn parse_id<T: FromStr>(text: &str) -> Result<T> {
    text.parse()
        .map_err(|_| corrupt(format!("bad id `{text}`")))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(corrupt)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Maps of strings and lists of strings always serialize.
    serde_json::to_string(value).unwrap_or_default()
}

fn machine_from_row(row: &SqliteRow) -> Result<MachineRecord> {
    Ok(MachineRecord {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        name: row.try_get("name")?,
        labels: from_json::<Labels>(&row.try_get::<String, _>("labels")?)?,
        hostname: row.try_get("hostname")?,
        os: row.try_get("os")?,
        arch: row.try_get("arch")?,
        agent_version: row.try_get("agent_version")?,
        interpreters: from_json(&row.try_get::<String, _>("interpreters")?)?,
        enrolled_at: row.try_get("enrolled_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
        deleted_at: row.try_get("deleted_at")?,
    })
}

fn targets_to_columns(targets: &Targets) -> (&'static str, String) {
    match targets {
        Targets::Machines(names) => ("machines", to_json(names)),
        Targets::Selector(selector) => ("selector", selector.to_string()),
        Targets::All => ("all", String::new()),
    }
}

fn run_from_row(
    row: &SqliteRow,
    counts: StateCounts,
    last_finished: Option<i64>,
) -> Result<RunRecord> {
    let kind: String = row.try_get("targets_kind")?;
    let value: String = row.try_get("targets_value")?;
    let targets = match kind.as_str() {
        "machines" => Targets::Machines(from_json(&value)?),
        "selector" => Targets::Selector(Selector::parse(&value).map_err(corrupt)?),
        "all" => Targets::All,
        other => return Err(corrupt(format!("unknown targets kind `{other}`"))),
    };
    let interpreter: Option<String> = row.try_get("interpreter")?;
    let interpreter: Option<Interpreter> = interpreter
        .map(|name| validate_interpreter(&name).map_err(corrupt))
        .transpose()?;
    let limit = |column: &str| -> Result<Option<RateLimit>> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|text| RateLimit::parse(&text, 0).map_err(corrupt))
            .transpose()
    };
    let total = counts.values().sum();
    let all_done = counts.iter().all(|(state, _)| state.is_terminal());
    Ok(RunRecord {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        created_at: row.try_get("created_at")?,
        targets,
        spec: RunSpec {
            script: row.try_get("script")?,
            interpreter,
            parameters: from_json(&row.try_get::<String, _>("parameters")?)?,
            env: from_json(&row.try_get::<String, _>("env")?)?,
            workdir: row.try_get("workdir")?,
            timeout: Duration::from_millis(row.try_get::<i64, _>("timeout_ms")? as u64),
            delivery_timeout: Duration::from_millis(
                row.try_get::<i64, _>("delivery_timeout_ms")? as u64
            ),
            max_concurrency: limit("max_concurrency")?,
            max_errors: limit("max_errors")?,
            script_uri: row.try_get("script_uri")?,
            script_sha256: row.try_get("script_sha256")?,
            output_blob_uri: row.try_get("output_blob_uri")?,
            error_blob_uri: row.try_get("error_blob_uri")?,
            protected_parameters: from_json(&row.try_get::<String, _>("protected_parameters")?)?,
            run_as_user: row.try_get("run_as_user")?,
            replaces: from_json::<Vec<String>>(&row.try_get::<String, _>("replaces")?)?
                .iter()
                .map(|id| parse_id(id))
                .collect::<Result<_>>()?,
        },
        stop_reason: row.try_get("stop_reason")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        counts,
        total,
        finished_at: if all_done { last_finished } else { None },
    })
}

fn execution_from_row(row: &SqliteRow) -> Result<ExecutionRecord> {
    Ok(ExecutionRecord {
        id: parse_id(&row.try_get::<String, _>("id")?)?,
        run_id: parse_id(&row.try_get::<String, _>("run_id")?)?,
        machine_id: parse_id(&row.try_get::<String, _>("machine_id")?)?,
        machine_name: row.try_get("machine_name")?,
        state: parse_state(&row.try_get::<String, _>("state")?)?,
        exit_code: row.try_get("exit_code")?,
        message: row.try_get("message")?,
        created_at: row.try_get("created_at")?,
        delivered_at: row.try_get("delivered_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        delivery_deadline: row.try_get("delivery_deadline")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        stdout_bytes: row.try_get::<i64, _>("stdout_bytes")? as u64,
        stderr_bytes: row.try_get::<i64, _>("stderr_bytes")? as u64,
        stdout_dropped: row.try_get::<i64, _>("stdout_dropped")? as u64,
        stderr_dropped: row.try_get::<i64, _>("stderr_dropped")? as u64,
        stdout_tail: row.try_get("stdout_tail")?,
        stderr_tail: row.try_get("stderr_tail")?,
        released: row.try_get::<i64, _>("released")? != 0,
        error_code: row.try_get("error_code")?,
    })
}

/// An `UPDATE ... FROM (VALUES ...)` of `rows` executions, each row `(id, machine or NULL,
/// values...)` with `width` columns in all; the state must allow moving to `next` (every
/// terminal state has the same predecessors), and a row with a machine only touches that
/// machine's execution.
fn batch_update(set: &str, width: usize, rows: usize, next: ExecutionState) -> String {
    let row = format!("({})", vec!["?"; width].join(", "));
    let values = vec![row; rows].join(", ");
    let allowed = predecessors(next);
    format!(
        "UPDATE executions SET {set} FROM (VALUES {values}) AS v \
         WHERE executions.id = v.column1 \
         AND (v.column2 IS NULL OR executions.machine_id = v.column2) \
         AND executions.state IN ({allowed}) RETURNING {RETURNED_COLUMNS}"
    )
}

/// The SQL list of states an execution may be in to move to `next`.
fn predecessors(next: ExecutionState) -> String {
    ExecutionState::ALL
        .into_iter()
        .filter(|state| state.can_become(next))
        .map(|state| format!("'{}'", state.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_token(
        &self,
        hash: &str,
        kind: TokenKind,
        machine_id: Option<MachineId>,
        now: UnixMillis,
    ) -> Result<()> {
        sqlx::query("INSERT INTO tokens (hash, kind, machine_id, created_at) VALUES (?, ?, ?, ?)")
            .bind(hash)
            .bind(kind.as_str())
            .bind(machine_id.map(|id| id.to_string()))
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn find_token(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let Some(row) = sqlx::query("SELECT kind, machine_id FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.readers)
            .await?
        else {
            return Ok(None);
        };
        let kind: String = row.try_get("kind")?;
        let machine_id: Option<String> = row.try_get("machine_id")?;
        Ok(Some(TokenRecord {
            kind: TokenKind::parse(&kind).ok_or_else(|| corrupt(format!("token kind `{kind}`")))?,
            machine_id: machine_id.as_deref().map(parse_id).transpose()?,
        }))
    }

    async fn enroll_machine(&self, machine: &NewMachine, token_hash: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        let taken = sqlx::query("SELECT 1 FROM machines WHERE name = ? AND deleted_at IS NULL")
            .bind(&machine.name)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if taken {
            return Err(StoreError::NameTaken(machine.name.clone()));
        }
        sqlx::query(
            "INSERT INTO machines (id, name, labels, hostname, os, arch, enrolled_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(machine.id.to_string())
        .bind(&machine.name)
        .bind(to_json(&machine.labels))
        .bind(&machine.hostname)
        .bind(&machine.os)
        .bind(&machine.arch)
        .bind(machine.enrolled_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO tokens (hash, kind, machine_id, created_at) VALUES (?, 'machine', ?, ?)",
        )
        .bind(token_hash)
        .bind(machine.id.to_string())
        .bind(machine.enrolled_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn update_machine_facts(&self, machine: &MachineRecord) -> Result<()> {
        sqlx::query(
            "UPDATE machines SET labels = ?, hostname = ?, os = ?, arch = ?, agent_version = ?, \
             interpreters = ?, last_seen_at = ? WHERE id = ?",
        )
        .bind(to_json(&machine.labels))
        .bind(&machine.hostname)
        .bind(&machine.os)
        .bind(&machine.arch)
        .bind(&machine.agent_version)
        .bind(to_json(&machine.interpreters))
        .bind(machine.last_seen_at)
        .bind(machine.id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn set_last_seen(&self, id: MachineId, at: UnixMillis) -> Result<()> {
        sqlx::query("UPDATE machines SET last_seen_at = ? WHERE id = ?")
            .bind(at)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn list_machines(&self) -> Result<Vec<MachineRecord>> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE deleted_at IS NULL ORDER BY name"
        );
        sqlx::query(&sql)
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(machine_from_row)
            .collect()
    }

    async fn get_machine(&self, id: MachineId) -> Result<Option<MachineRecord>> {
        let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?");
        sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?
            .as_ref()
            .map(machine_from_row)
            .transpose()
    }

    async fn find_machine_by_name(&self, name: &str) -> Result<Option<MachineRecord>> {
        // The live machine of that name, else the one deleted last.
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE name = ? \
             ORDER BY deleted_at IS NOT NULL, deleted_at DESC LIMIT 1"
        );
        sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.readers)
            .await?
            .as_ref()
            .map(machine_from_row)
            .transpose()
    }

    async fn delete_machine(&self, id: MachineId, now: UnixMillis) -> Result<Outcome> {
        let id = id.to_string();
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "UPDATE executions SET state = 'failed', finished_at = ?, \
             message = 'the machine was deleted before the execution ended' \
             WHERE machine_id = ? AND state IN ('pending', 'delivered', 'running') \
             RETURNING {EXECUTION_COLUMNS}"
        );
        let ended = sqlx::query(&sql)
            .bind(now)
            .bind(&id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(execution_from_row)
            .collect::<Result<Vec<_>>>()?;
        sqlx::query("DELETE FROM tokens WHERE machine_id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE machines SET deleted_at = ? WHERE id = ?")
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let outcome = settle(&mut tx, ended, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn create_run(&self, run: &NewRun, executions: &[NewExecution]) -> Result<Outcome> {
        let mut tx = self.writer.begin().await?;
        let outcome = insert_run(&mut tx, run, executions).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn put_run_command(
        &self,
        command: &RunCommandRecord,
        run: &NewRun,
        executions: &[NewExecution],
    ) -> Result<Outcome> {
        let mut tx = self.writer.begin().await?;
        let previous: Option<String> =
            sqlx::query_scalar("SELECT run_id FROM run_commands WHERE machine_id = ? AND name = ?")
                .bind(command.machine_id.to_string())
                .bind(&command.name)
                .fetch_optional(&mut *tx)
                .await?;
        let outcome = insert_run(&mut tx, run, executions).await?;
        sqlx::query(&format!(
            "INSERT INTO run_commands ({RUN_COMMAND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (machine_id, name) DO UPDATE SET run_id = excluded.run_id, \
             async_execution = excluded.async_execution, \
             treat_failure_as_deployment_failure = excluded.treat_failure_as_deployment_failure, \
             updated_at = excluded.updated_at"
        ))
        .bind(command.machine_id.to_string())
        .bind(&command.name)
        .bind(command.run_id.to_string())
        .bind(command.async_execution as i64)
        .bind(command.treat_failure_as_deployment_failure as i64)
        .bind(command.created_at)
        .bind(command.updated_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE runs SET run_command = ? WHERE id = ?")
            .bind(&command.name)
            .bind(command.run_id.to_string())
            .execute(&mut *tx)
            .await?;
        if let Some(previous) = previous {
            forget_secrets_if_over(&mut tx, parse_id(&previous)?).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn open_run_command_executions(
        &self,
        machine: MachineId,
        name: &str,
    ) -> Result<Vec<ExecutionRecord>> {
        let sql = format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions WHERE machine_id = ? \
             AND state IN ('pending', 'delivered', 'running') \
             AND run_id IN (SELECT id FROM runs WHERE run_command = ?)"
        );
        sqlx::query(&sql)
            .bind(machine.to_string())
            .bind(name)
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(execution_from_row)
            .collect()
    }

    async fn get_run_command(
        &self,
        machine: MachineId,
        name: &str,
    ) -> Result<Option<RunCommandRecord>> {
        let sql = format!(
            "SELECT {RUN_COMMAND_COLUMNS} FROM run_commands WHERE machine_id = ? AND name = ?"
        );
        sqlx::query(&sql)
            .bind(machine.to_string())
            .bind(name)
            .fetch_optional(&self.readers)
            .await?
            .map(|row| run_command_from_row(&row))
            .transpose()
    }

    async fn list_run_commands(&self, machine: MachineId) -> Result<Vec<RunCommandRecord>> {
        let sql = format!(
            "SELECT {RUN_COMMAND_COLUMNS} FROM run_commands WHERE machine_id = ? ORDER BY name"
        );
        sqlx::query(&sql)
            .bind(machine.to_string())
            .fetch_all(&self.readers)
            .await?
            .iter()
            .map(run_command_from_row)
            .collect()
    }

    async fn delete_run_command(&self, machine: MachineId, name: &str) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let deleted: Option<String> = sqlx::query_scalar(
            "DELETE FROM run_commands WHERE machine_id = ? AND name = ? RETURNING run_id",
        )
        .bind(machine.to_string())
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(run) = &deleted {
            forget_secrets_if_over(&mut tx, parse_id(run)?).await?;
        }
        tx.commit().await?;
        Ok(deleted.is_some())
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?");
        let rows = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_all(&self.readers)
            .await?;
        Ok(self.runs_with_counts(rows).await?.into_iter().next())
    }

    async fn get_run_spec(&self, id: RunId) -> Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?");
        sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.readers)
            .await?
            .map(|row| run_from_row(&row, StateCounts::new(), None))
            .transpose()
    }

    async fn list_runs(&self, before: Option<RunId>, limit: u32) -> Result<Vec<RunRecord>> {
        // UUIDv7 ids sort by creation time, so the id is the cursor.
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id < ? ORDER BY id DESC LIMIT ?");
        let before = before
            .map(|id| id.to_string())
            .unwrap_or_else(|| "~".to_string());
        let rows = sqlx::query(&sql)
            .bind(before)
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await?;
        self.runs_with_counts(rows).await
    }

    async fn run_executions(&self, id: RunId) -> Result<Vec<ExecutionRecord>> {
        self.executions_where("run_id = ?", &id.to_string()).await
    }

    async fn get_execution(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>> {
        Ok(self
            .executions_where("id = ?", &id.to_string())
            .await?
            .into_iter()
            .next())
    }

    async fn open_executions(&self, machine: MachineId) -> Result<Vec<ExecutionRecord>> {
        self.executions_where(
            "machine_id = ? AND (state IN ('delivered', 'running') \
             OR (state = 'pending' AND released = 1))",
            &machine.to_string(),
        )
        .await
    }

    async fn apply(&self, updates: &[ExecutionUpdate], now: UnixMillis) -> Result<Outcome> {
        if updates.is_empty() {
            return Ok(Outcome::default());
        }
        // One statement per kind of change and chunk of rows, not one per update: a fan-out to
        // 10,000 machines is then a few dozen statements. For any one execution the kinds
        // come in this order (delivered, started, finished), so applying kind by kind is the
        // same as applying the updates in order.
        let finished: Vec<_> = updates
            .iter()
            .filter(|u| matches!(u.change, Change::Finished(_)))
            .collect();
        let mut tx = self.writer.begin().await?;
        let mut changed = Vec::new();
        let stamps = [
            (
                ExecutionState::Delivered,
                "state = 'delivered', delivered_at = v.column3",
            ),
            (
                ExecutionState::Running,
                "state = 'running', started_at = v.column3, \
                 delivered_at = COALESCE(delivered_at, v.column3)",
            ),
        ];
        for (next, set) in stamps {
            let stamped: Vec<(&ExecutionUpdate, UnixMillis)> = updates
                .iter()
                .filter_map(|update| match update.change {
                    Change::Delivered { at } if next == ExecutionState::Delivered => {
                        Some((update, at))
                    }
                    Change::Started { at } if next == ExecutionState::Running => Some((update, at)),
                    _ => None,
                })
                .collect();
            for chunk in stamped.chunks(300) {
                let sql = batch_update(set, 3, chunk.len(), next);
                let mut query = sqlx::query(&sql);
                for (update, at) in chunk {
                    query = query
                        .bind(update.id.to_string())
                        .bind(update.machine.map(|machine| machine.to_string()))
                        .bind(*at);
                }
                for row in query.fetch_all(&mut *tx).await? {
                    changed.push(execution_from_row(&row)?);
                }
            }
        }
        for chunk in finished.chunks(200) {
            let sql = batch_update(
                "state = v.column3, exit_code = v.column4, message = v.column5, \
                 started_at = COALESCE(started_at, v.column6), finished_at = v.column7, \
                 stdout_bytes = v.column8, stderr_bytes = v.column9, stdout_dropped = v.column10, \
                 stderr_dropped = v.column11, stdout_tail = v.column12, stderr_tail = v.column13, \
                 error_code = v.column14",
                14,
                chunk.len(),
                ExecutionState::Succeeded,
            );
            let mut query = sqlx::query(&sql);
            for update in chunk {
                let Change::Finished(finish) = &update.change else {
                    continue;
                };
                if !finish.state.is_terminal() {
                    return Err(corrupt(format!(
                        "finish of {} with state {}",
                        update.id, finish.state
                    )));
                }
                query = query
                    .bind(update.id.to_string())
                    .bind(update.machine.map(|machine| machine.to_string()))
                    .bind(finish.state.as_str())
                    .bind(finish.exit_code)
                    .bind(finish.message.clone())
                    .bind(finish.started_at)
                    .bind(finish.finished_at)
                    .bind(finish.stdout_bytes as i64)
                    .bind(finish.stderr_bytes as i64)
                    .bind(finish.stdout_dropped as i64)
                    .bind(finish.stderr_dropped as i64)
                    .bind(finish.stdout_tail.clone())
                    .bind(finish.stderr_tail.clone())
                    .bind(finish.error_code.clone());
            }
            for row in query.fetch_all(&mut *tx).await? {
                changed.push(execution_from_row(&row)?);
            }
        }
        let outcome = settle(&mut tx, changed, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn cancel_run(&self, id: RunId, now: UnixMillis) -> Result<CancelOutcome> {
        let run_id = id;
        let id = id.to_string();
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        let skipped = sqlx::query(&format!(
            "UPDATE executions SET state = 'skipped', finished_at = ?, \
             message = 'the run was canceled before this execution was delivered' \
             WHERE run_id = ? AND state = 'pending' RETURNING {EXECUTION_COLUMNS}"
        ))
        .bind(now)
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(execution_from_row)
        .collect::<Result<Vec<_>>>()?;
        let to_cancel = sqlx::query(&format!(
            "UPDATE executions SET cancel_requested = 1 \
             WHERE run_id = ? AND state IN ('delivered', 'running') RETURNING {EXECUTION_COLUMNS}"
        ))
        .bind(&id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(execution_from_row)
        .collect::<Result<Vec<_>>>()?;
        let mut outcome = Outcome {
            changed: skipped,
            ..Outcome::default()
        };
        if to_cancel.is_empty() && !outcome.changed.is_empty() && !has_open(&mut tx, run_id).await?
        {
            forget_secrets(&mut tx, run_id).await?;
            outcome.finished_runs.push(run_id);
        }
        tx.commit().await?;
        Ok(CancelOutcome { outcome, to_cancel })
    }

    async fn next_delivery_deadline(&self) -> Result<Option<UnixMillis>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(delivery_deadline) FROM executions WHERE state = 'pending' AND released = 1",
        )
        .fetch_one(&self.readers)
        .await?)
    }

    async fn expire_deliveries(&self, now: UnixMillis) -> Result<Outcome> {
        let mut tx = self.writer.begin().await?;
        let expired = sqlx::query(&format!(
            "UPDATE executions SET state = 'delivery_timed_out', finished_at = ?, \
             message = 'the machine did not take the execution before its delivery timeout' \
             WHERE state = 'pending' AND released = 1 AND delivery_deadline <= ? \
             RETURNING {EXECUTION_COLUMNS}"
        ))
        .bind(now)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(execution_from_row)
        .collect::<Result<Vec<_>>>()?;
        let outcome = settle(&mut tx, expired, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn held_back_runs(&self) -> Result<Vec<RunId>> {
        sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT run_id FROM executions WHERE state = 'pending' AND released = 0",
        )
        .fetch_all(&self.readers)
        .await?
        .iter()
        .map(|id| parse_id(id))
        .collect()
    }

    async fn advance_runs(&self, runs: &[RunId], now: UnixMillis) -> Result<Outcome> {
        let mut tx = self.writer.begin().await?;
        let outcome = advance(&mut tx, runs, now).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// After executions changed: advances the rate-limited runs that some of them ended in, and
/// notes the runs that just finished.
async fn settle(
    tx: &mut Transaction<'_, Sqlite>,
    changed: Vec<ExecutionRecord>,
    now: UnixMillis,
) -> Result<Outcome> {
    let mut ended_in: Vec<RunId> = changed
        .iter()
        .filter(|execution| execution.state.is_terminal())
        .map(|execution| execution.run_id)
        .collect();
    ended_in.sort();
    ended_in.dedup();
    let mut outcome = advance(tx, &ended_in, now).await?;
    outcome.changed.splice(0..0, changed);
    for run in ended_in {
        if !has_open(tx, run).await? {
            forget_secrets(tx, run).await?;
            outcome.finished_runs.push(run);
        }
    }
    Ok(outcome)
}

/// Blanks the protected parameter values of a run that is over, keeping their names: nothing
/// will send them again. The latest run of a named run command keeps them, since a `PATCH`
/// runs it again with them.
async fn forget_secrets(tx: &mut Transaction<'_, Sqlite>, run: RunId) -> Result<()> {
    sqlx::query(
        "UPDATE runs SET protected_parameters = \
         (SELECT json_group_object(key, '') FROM json_each(runs.protected_parameters)) \
         WHERE id = ?1 AND protected_parameters != '{}' \
         AND NOT EXISTS (SELECT 1 FROM run_commands WHERE run_id = ?1)",
    )
    .bind(run.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// `forget_secrets` for a run that may still be open.
async fn forget_secrets_if_over(tx: &mut Transaction<'_, Sqlite>, run: RunId) -> Result<()> {
    if !has_open(tx, run).await? {
        forget_secrets(tx, run).await?;
    }
    Ok(())
}

async fn has_open(tx: &mut Transaction<'_, Sqlite>, run: RunId) -> Result<bool> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT EXISTS(SELECT 1 FROM executions WHERE run_id = ? \
         AND state IN ('pending', 'delivered', 'running'))",
    )
    .bind(run.to_string())
    .fetch_one(&mut **tx)
    .await?
        != 0)
}

/// Applies `domain::next_step` to each run that holds executions back.
async fn advance(
    tx: &mut Transaction<'_, Sqlite>,
    runs: &[RunId],
    now: UnixMillis,
) -> Result<Outcome> {
    let mut outcome = Outcome::default();
    for run in runs {
        let run_id = run.to_string();
        let Some(row) = sqlx::query(
            "SELECT max_concurrency, max_errors, delivery_timeout_ms, stop_reason FROM runs WHERE id = ?",
        )
        .bind(&run_id)
        .fetch_optional(&mut **tx)
        .await?
        else {
            continue;
        };
        let limit = |column: &str| -> Result<Option<RateLimit>> {
            let text: Option<String> = row.try_get(column)?;
            text.map(|text| RateLimit::parse(&text, 0).map_err(corrupt))
                .transpose()
        };
        let (max_concurrency, max_errors) = (limit("max_concurrency")?, limit("max_errors")?);
        if max_concurrency.is_none() && max_errors.is_none() {
            continue;
        }
        let delivery_timeout: i64 = row.try_get("delivery_timeout_ms")?;
        let mut progress = RunProgress {
            total: 0,
            in_flight: 0,
            errors: 0,
            held_back: 0,
        };
        let counts = sqlx::query(
            "SELECT state, released, COUNT(*) AS n FROM executions WHERE run_id = ? GROUP BY state, released",
        )
        .bind(&run_id)
        .fetch_all(&mut **tx)
        .await?;
        for count in &counts {
            let state = parse_state(&count.try_get::<String, _>("state")?)?;
            let released = count.try_get::<i64, _>("released")? != 0;
            let n = count.try_get::<i64, _>("n")? as u64;
            progress.total += n;
            if state.is_terminal() {
                if is_error(state) {
                    progress.errors += n;
                }
            } else if released {
                progress.in_flight += n;
            } else {
                progress.held_back += n;
            }
        }
        match next_step(progress, max_concurrency, max_errors) {
            RunStep::Release(0) => {}
            RunStep::Release(count) => {
                let released = sqlx::query(&format!(
                    "UPDATE executions SET released = 1, delivery_deadline = ? WHERE id IN \
                     (SELECT id FROM executions WHERE run_id = ? AND state = 'pending' \
                     AND released = 0 ORDER BY id LIMIT ?) RETURNING {EXECUTION_COLUMNS}"
                ))
                .bind(now.saturating_add(delivery_timeout))
                .bind(&run_id)
                .bind(count as i64)
                .fetch_all(&mut **tx)
                .await?;
                for row in &released {
                    outcome.released.push(execution_from_row(row)?);
                }
            }
            RunStep::Stop(reason) => {
                sqlx::query("UPDATE runs SET stop_reason = ? WHERE id = ?")
                    .bind(&reason)
                    .bind(&run_id)
                    .execute(&mut **tx)
                    .await?;
                let skipped = sqlx::query(&format!(
                    "UPDATE executions SET state = 'skipped', finished_at = ?, \
                     message = 'never sent: max_errors was reached' \
                     WHERE run_id = ? AND state = 'pending' AND released = 0 \
                     RETURNING {EXECUTION_COLUMNS}"
                ))
                .bind(now)
                .bind(&run_id)
                .fetch_all(&mut **tx)
                .await?;
                for row in &skipped {
                    outcome.changed.push(execution_from_row(row)?);
                }
            }
        }
    }
    Ok(outcome)
}
