//! `berth`: the binary. Everything it does is in the library (`lib.rs`).

fn main() -> std::process::ExitCode {
    berth::commands::main()
}
