//! Every type that crosses a process boundary: the REST API's bodies (`api`) and the messages
//! between agent and server (`agent`). These are the only types serialized for the outside
//! world; the server and the agent convert them to domain types at the edge.

pub mod agent;
pub mod api;
pub mod run_command;
