//! `berth`'s library: everything the binary does, so that hooks and commands
//! can be tested in-process. `main.rs` only calls [`commands::main`].
//!
//! The hooks (`config`, `prepare`, `run`, `cleanup`) and the admin commands
//! return [`Error`]; [`exit::process_exit_code`] is the one function that
//! turns how a command ended into the process's exit code.

pub mod cli;
pub mod commands;
pub mod config;
pub mod doctor;
pub mod error;
pub mod exec;
pub mod exit;
pub mod hooks;
pub mod image;
pub mod plugin;
pub mod ps;
pub mod registry;

pub use error::Error;
