//! The fleetrun domain: identifiers, run specifications, targets, execution states and the rules
//! that validate them. No I/O happens here; every other crate builds on these types.

mod ids;
mod labels;
mod limits;
mod rate;
mod spec;
mod state;
mod template;
mod units;

pub use ids::{ExecutionId, MachineId, RunId};
pub use labels::{Labels, Selector, SelectorError, check_labels, parse_labels};
pub use limits::Limits;
pub use rate::{RateLimit, RunProgress, RunStep, is_error, next_step};
pub use spec::{
    Interpreter, RunRequest, RunSpec, Targets, ValidationError, validate_env_name,
    validate_interpreter,
};
pub use state::{ExecutionState, RunStatus, StateCounts};
pub use template::{TemplateError, render, validate_parameter_name};
pub use units::{parse_byte_size, parse_duration};

/// Milliseconds since the Unix epoch: the one time representation stored and sent.
pub type UnixMillis = i64;
