//! `berth`: the binary. Argument parsing and glue; the logic lives in the
//! library crates (`backend-api`, `backends/*`, `conformance-tests`).

mod cli;
mod commands;
mod config;
mod exec;
mod exit;
mod hooks;
mod image;
mod plugin;
mod registry;

fn main() -> std::process::ExitCode {
    commands::main()
}
