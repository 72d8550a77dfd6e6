//! Named limits, each more generous than the clouds' and each configurable.

use std::time::Duration;

/// The limits a server enforces. Every one has a default and can be changed in the server's
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest script accepted inline (OCI: 4 KB, Alibaba: 16 KB).
    pub max_script_bytes: u64,
    /// Output kept per stream and execution; the rest is dropped and counted.
    pub output_cap_bytes: u64,
    /// Default execution timeout when a run names none.
    pub default_timeout: Duration,
    /// Default time a run waits for an offline machine to connect.
    pub default_delivery_timeout: Duration,
    /// Longest execution timeout or delivery timeout a run may ask for.
    pub max_timeout: Duration,
    /// Most parameters, and most environment variables, per run.
    pub max_parameters: usize,
    /// Most machines a run may name one by one (selectors and `all` have no limit).
    pub max_named_targets: usize,
    pub max_parameter_value_bytes: usize,
}

impl Limits {
    /// Bytes of each stream's end kept inline on an execution.
    pub const TAIL_BYTES: usize = 4096;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_script_bytes: 1 << 20,
            output_cap_bytes: 64 << 20,
            default_timeout: Duration::from_secs(3600),
            default_delivery_timeout: Duration::from_secs(600),
            max_timeout: Duration::from_secs(7 * 86400),
            max_parameters: 256,
            max_named_targets: 100_000,
            max_parameter_value_bytes: 64 << 10,
        }
    }
}
