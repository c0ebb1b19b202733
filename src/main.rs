//! The `porthole` binary: everything lives in the library; see `porthole::cli`.

fn main() -> std::process::ExitCode {
    porthole::cli::main()
}
