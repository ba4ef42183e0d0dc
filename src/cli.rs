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
    /// Write the man pages and the shell completions into a directory (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// The directory: gets man/*.1 and completions/{bash,zsh,fish} files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
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
