//! The Smaregi simulator and a relay config pointing at it.

use std::path::Path;

use smaregi_relay::config::{self, Config};
use smaregi_sim::{SimConfig, Simulator};

pub const CONTRACT_ID: &str = "sim_contract";
pub const ACCESS_TOKEN: &str = "sim-access-token-0123456789";
/// The terminal our transactions are registered under.
pub const TERMINAL: &str = "9";

/// A simulator on a free loopback port, plain HTTP, no rate limit.
pub async fn simulator() -> Simulator {
    Simulator::start(SimConfig::local(CONTRACT_ID, ACCESS_TOKEN))
        .await
        .unwrap()
}

/// A relay config in `dir` whose `[smaregi]` calls `endpoint`, with
/// `extra` lines added to that section (and sections after it).
pub fn relay_config(dir: &Path, endpoint: &str, extra: &str) -> Config {
    super::write_file(dir, "smaregi-token", ACCESS_TOKEN, 0o600);
    let path = super::write_config(
        dir,
        &format!(
            "[smaregi]\nendpoint = \"{endpoint}\"\ncontract-id = \"{CONTRACT_ID}\"\n\
             access-token = {{ file = \"smaregi-token\" }}\nterminal-id = \"{TERMINAL}\"\n{extra}\n"
        ),
    );
    config::load(&path).unwrap_or_else(|e| panic!("{e}")).config
}
