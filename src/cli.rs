//! The command line of the `smaregi-relay` binary.
//!
//! Only the definition lives here, so that the binary, tests and the
//! generators of shell completions and the man page share it. Running a
//! command is the binary's job; what each command does is in its module.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

/// Relays Smaregi POS notifications and transactions for a store, without losing work.
#[derive(Debug, Parser)]
#[command(name = "smaregi-relay", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (what systemd starts).
    Run(ConfigArgs),
    /// Check a configuration file: print `ok`, or every problem as PATH:LINE:COL: message.
    ///
    /// Exits 0 when the file is valid (warnings are printed on stderr), 78 when
    /// it is invalid, 66 when it cannot be read.
    CheckConfig(ConfigArgs),
    /// Product mapping files.
    #[command(subcommand)]
    Mapping(MappingCommand),
}

#[derive(Debug, Subcommand)]
pub enum MappingCommand {
    /// Check a mapping CSV offline and print the report the import would write.
    ///
    /// Nothing is imported and the daemon need not run. Exits 0 when the
    /// file would be imported, 1 when it would be rejected, 66 when it
    /// cannot be read.
    Check {
        /// The CSV file.
        file: PathBuf,
        /// Take the limits (`[mapping]`) from this config file instead of the defaults.
        #[arg(long, short, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
