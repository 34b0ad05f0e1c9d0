//! The `switchyard` binary: parse arguments, then hand over to the library.

fn main() -> std::process::ExitCode {
    switchyard_proxy::cli::main()
}
