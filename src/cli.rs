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
    /// Try the relay out: a simulated Smaregi, the daemon and a demo EC site in one process.
    ///
    /// Runs a scripted story in a temporary state directory (mapping CSV,
    /// stock notifications, orders edited and cancelled, a Smaregi outage),
    /// prints each step as it is confirmed, then keeps the daemon running
    /// until Ctrl-C. Needs no config and touches nothing outside its
    /// directory. Exits 0 when every step was confirmed, 70 when one was
    /// not within its deadline, 130 when interrupted before the end.
    Demo(DemoArgs),
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
    /// Write the man pages and the shell completions into a directory (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// The directory: gets man/*.1 and completions/{bash,zsh,fish} files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Show whether everything is flowing: the outbox, pauses, blocked keys.
    ///
    /// Exits 0 when the daemon answered, 69 when it cannot be reached.
    Status(ControlArgs),
    /// The outbox: the calls owed to Smaregi and to the store's EC side.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Stop delivering to an upstream (停止); notifications and orders are
    /// still accepted and queued. Survives restarts until `resume`.
    Pause {
        /// `smaregi` or `downstream`.
        #[arg(default_value = "smaregi")]
        upstream: String,
        /// Why, for whoever looks at `status` next.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Deliver to an upstream again (稼働).
    Resume {
        #[arg(default_value = "smaregi")]
        upstream: String,
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// How to reach the running daemon.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The configuration file, for `[admin] control-socket`.
    #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// The control socket, instead of the config's.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List jobs, oldest first.
    List {
        /// pending, parked, done or discarded.
        #[arg(long)]
        state: Option<String>,
        /// e.g. smaregi.transaction-register, stock.push.
        #[arg(long)]
        kind: Option<String>,
        /// An ordering key, e.g. order:EC-1.
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Show one job with its attempt history.
    Show {
        id: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Attempt a parked job (or a waiting one) now.
    Retry {
        #[arg(required_unless_present = "all_parked", conflicts_with = "all_parked")]
        id: Option<u64>,
        /// Every parked job.
        #[arg(long)]
        all_parked: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Give a job up for good, with a reason kept for audit.
    Discard {
        id: u64,
        #[arg(long)]
        reason: String,
        /// Confirm: a discarded call is never made.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        control: ControlArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum MappingCommand {
    /// The current mapping version: its file, time and row counts.
    Status(ControlArgs),
    /// Look a product up in the current mapping, either way.
    Lookup {
        /// An external code (the EC side's).
        #[arg(
            long,
            conflicts_with = "smaregi_id",
            required_unless_present = "smaregi_id"
        )]
        external_code: Option<String>,
        /// A Smaregi 商品ID.
        #[arg(long)]
        smaregi_id: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Every mapping version kept, oldest first.
    History(ControlArgs),
    /// Make an earlier version current again (held orders it knows are then registered).
    Rollback {
        /// The version to make current (see `mapping history`).
        #[arg(value_name = "VERSION")]
        to_version: u64,
        #[command(flatten)]
        control: ControlArgs,
    },
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
pub struct DemoArgs {
    /// Stop the daemon and exit once the scripted steps are done, instead
    /// of waiting for Ctrl-C (for scripts and tests).
    #[arg(long)]
    pub exit_when_done: bool,
    /// Keep the state directory (config, database, log) in DIR, which must
    /// be empty or not exist, instead of a temporary one removed at exit.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The configuration file.
    #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// Writes the man pages (one per command) into `out/man` and the bash,
/// zsh and fish completions into `out/completions`.
pub fn generate_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;

    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "smaregi-relay", &completions)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn generated_docs_cover_every_command_and_shell() {
        let out = tempfile::tempdir().unwrap();
        generate_docs(out.path()).unwrap();
        for page in [
            "smaregi-relay.1",
            "smaregi-relay-run.1",
            "smaregi-relay-check-config.1",
        ] {
            let text = std::fs::read_to_string(out.path().join("man").join(page)).unwrap();
            assert!(text.contains(".TH"), "{page} is not a man page");
        }
        assert!(!out
            .path()
            .join("man/smaregi-relay-generate-docs.1")
            .exists());
        for file in ["smaregi-relay.bash", "_smaregi-relay", "smaregi-relay.fish"] {
            let text = std::fs::read_to_string(out.path().join("completions").join(file)).unwrap();
            assert!(text.contains("check-config"), "{file} lacks check-config");
        }
    }
}
