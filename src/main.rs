//! The `smaregi-relay` binary: parses the command line, runs the library,
//! maps the result to an exit code (see `smaregi_relay::exit`).

use std::process::ExitCode;

use clap::Parser;
use smaregi_relay::cli::{Cli, Command, MappingCommand};
use smaregi_relay::{cli, config, control, daemon, demo, exit, mapping, telemetry};

// glibc's malloc was a fifth of the daemon's CPU under a burst of
// notifications (sled's pages, forms, TLS records); mimalloc costs a
// fraction of that (README: Intake, throughput).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let code = match Cli::parse().command {
        Command::Run(args) => match daemon::run(&args.config) {
            Ok(()) => exit::OK,
            Err(error) => {
                telemetry::report_fatal(&error);
                error.exit_code()
            }
        },
        // The demo has printed what went wrong, if anything.
        Command::Demo(args) => match demo::run(&(&args).into()) {
            Ok(()) => exit::OK,
            Err(error) => error.exit_code(),
        },
        Command::GenerateDocs { out } => match cli::generate_docs(&out) {
            Ok(()) => exit::OK,
            Err(error) => {
                eprintln!("smaregi-relay: cannot write to {}: {error}", out.display());
                exit::CANT_CREATE
            }
        },
        Command::CheckConfig(args) => match config::load(&args.config) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    eprintln!("{warning}");
                }
                println!("ok");
                exit::OK
            }
            Err(error) => {
                eprintln!("{error}");
                error.exit_code()
            }
        },
        Command::Mapping(MappingCommand::Check { file, config }) => {
            mapping::check_command(&file, config.as_deref())
        }
        operator => {
            control::client::run_cli(operator).expect("every other command is an operator command")
        }
    };
    ExitCode::from(code)
}
