//! The integration tests: the real `fleetrun` binary as server, agents and CLI on loopback,
//! driven as an operator would drive it. One test binary, so that it links once.

mod bad_input;
mod bench;
mod dev;
mod harness;
mod rate;
mod resilience;
mod run_commands;
mod runs;
mod sources;
