//! The agent protocol: binary MessagePack frames over one WebSocket that the agent opens.
//!
//! The conversation:
//! 1. The agent sends `Hello` with every execution its journal holds.
//! 2. The server answers `Welcome` with, for each held execution it still wants, how many bytes
//!    of each stream it already has. The agent resends the rest, then `Finished` if the
//!    execution is over. A held execution the server does not name is over as far as the
//!    server is concerned: the agent stops it if it still runs and forgets it.
//! 3. The server sends `Execute` for work the agent does not hold; the agent writes it to its
//!    journal, then answers `Accepted` (at most once: an id already in the journal is never run
//!    again). Then `Started`, `Output` (in order, by byte offset), `Finished`.
//! 4. The server answers `Finished` with `Ack` once the result is stored; only then does the
//!    agent delete its copy. Nothing is lost across disconnects or restarts of either side.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 2;

/// The largest output chunk an agent puts in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

/// Largest frame either side accepts: an `Execute` carries a script of up to the server's
/// limit, so this is generous.
pub const MAX_FRAME_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    Accepted {
        execution_id: Uuid,
    },
    Started {
        execution_id: Uuid,
        pid: u32,
        at: i64,
    },
    Output {
        execution_id: Uuid,
        stream: Stream,
        /// Byte offset of `data` in the stream.
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Finished(Finished),
    Pong {
        nonce: u64,
    },
}

/// What an agent says of itself when it connects.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub agent_version: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub labels: BTreeMap<String, String>,
    pub interpreters: Vec<String>,
    pub max_parallel: u32,
    pub held: Vec<HeldExecution>,
}

/// An execution in the agent's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldExecution {
    pub execution_id: Uuid,
    pub phase: HeldPhase,
    /// When it started, if it has.
    pub started_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldPhase {
    /// Accepted, waiting for a free slot.
    Queued,
    Running,
    /// Over; its result waits for the server's `Ack`.
    Finished,
}

/// How an execution ended on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    Canceled,
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub execution_id: Uuid,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// Why, when the exit code alone does not say (could not start, killed by a signal).
    pub message: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: i64,
    /// Bytes of each stream; everything up to these has been sent in `Output` before this.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Bytes beyond the output cap, not kept.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// A stable name for why it failed without running the script, or what went wrong after
    /// it: `InterpreterNotFound`, `ScriptDownloadFailed`, `ScriptChecksumMismatch`,
    /// `OutputUploadFailed`, ...
    #[serde(default)]
    pub error_code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMessage {
    Welcome {
        machine_id: Uuid,
        resume: Vec<Resume>,
    },
    /// Boxed: it is by far the largest message, and every queued message takes the size of
    /// the largest.
    Execute(Box<Execute>),
    Cancel {
        execution_id: Uuid,
    },
    /// The server stored this execution's result; the agent may forget it.
    Ack {
        execution_id: Uuid,
    },
    Ping {
        nonce: u64,
    },
}

/// How much of a held execution's output the server already has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub execution_id: Uuid,
    pub stdout_offset: u64,
    pub stderr_offset: u64,
    /// The operator canceled it while the agent was away.
    pub cancel: bool,
}

/// One execution for the agent to run.
/// Its `Debug` leaves out the script and the environment, which may hold protected values.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Execute {
    pub execution_id: Uuid,
    pub run_id: Uuid,
    /// The script with its parameters already substituted.
    pub script: String,
    /// A program to run the script with; none means the script's `#!` line, else bash, else sh.
    pub interpreter: Option<String>,
    /// Parameters and environment variables, exported to the script.
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub timeout_ms: u64,
    /// Bytes kept per stream; the rest is counted and dropped.
    pub output_cap_bytes: u64,
    /// Fetch the script from this HTTP(S) URL (a pre-signed S3 URL, an OCI PAR, an Azure SAS
    /// URL...) instead of `script`, which is then empty.
    #[serde(default)]
    pub script_uri: Option<String>,
    /// Hex SHA-256 the downloaded script must have.
    #[serde(default)]
    pub script_sha256: Option<String>,
    /// Largest script the agent downloads from `script_uri`.
    #[serde(default)]
    pub max_script_bytes: u64,
    /// When the execution ends, upload the whole of stdout (and stderr) here with an HTTP PUT
    /// (a pre-signed URL). The output is kept by fleetrun as well.
    #[serde(default)]
    pub output_blob_uri: Option<String>,
    #[serde(default)]
    pub error_blob_uri: Option<String>,
    /// Run the script as this user: the agent must run as root (or as that user).
    #[serde(default)]
    pub run_as_user: Option<String>,
    /// Earlier executions that must be gone from this machine before this one starts: the
    /// agent cancels those it holds and waits until their process groups are gone.
    #[serde(default)]
    pub replaces: Vec<Uuid>,
}

impl std::fmt::Debug for Execute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execute")
            .field("execution_id", &self.execution_id)
            .field("run_id", &self.run_id)
            .field("interpreter", &self.interpreter)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout_ms", &self.timeout_ms)
            .field("run_as_user", &self.run_as_user)
            .field("replaces", &self.replaces)
            .finish_non_exhaustive()
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed agent protocol frame: {0}")]
pub struct DecodeError(#[from] rmp_serde::decode::Error);

pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain structs into a Vec cannot fail: no map has non-string keys and
    // no type has a fallible Serialize.
    rmp_serde::to_vec_named(message).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_bytes_survive_exactly() {
        let data: Vec<u8> = (0..=255).chain([0xff, 0xfe, 0, 0xc3]).collect();
        let message = AgentMessage::Output {
            execution_id: Uuid::now_v7(),
            stream: Stream::Stderr,
            offset: 12,
            data: data.clone(),
        };
        let bytes = encode(&message);
        // Bytes stay bytes: a MessagePack bin, not a list of numbers or base64.
        assert!(bytes.len() < data.len() + 100);
        let back: AgentMessage = decode(&bytes).expect("decodes");
        assert_eq!(back, message);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode::<AgentMessage>(b"\xc1not msgpack").is_err());
        assert!(decode::<ServerMessage>(&encode(&AgentMessage::Pong { nonce: 1 })).is_err());
    }
}
