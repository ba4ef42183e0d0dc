use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use smaregi_sim::sender::Sender;
use smaregi_sim::{SimConfig, Simulator};

/// A Smaregi legacy API simulator (and notification sender) for testing smaregi-relay.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// POST one API送信 notification (proc_name, params, custom parameters) to a URL.
    Send(Send),
}

#[derive(Debug, Args)]
struct Serve {
    /// Address to listen on, e.g. 127.0.0.1:8443 (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The 契約ID calls must carry in X_contract_id.
    #[arg(long)]
    contract_id: Option<String>,
    /// The アクセストークン calls must carry in X_access_token.
    #[arg(long)]
    access_token: Option<String>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Keep the contract's data in this JSON file across runs.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Calls per second per contract; 0: no limit.
    #[arg(long, default_value_t = 10.0)]
    rate_limit: f64,
}

#[derive(Debug, Args)]
struct Send {
    /// Where to POST, e.g. https://127.0.0.1:8443/smaregi/notify
    #[arg(long)]
    url: String,
    /// stock_send, transaction_send, product_send or customer_send.
    #[arg(long)]
    proc_name: String,
    /// The params JSON, e.g. '{"data":[{"table_name":"Stock","rows":[…]}]}'.
    #[arg(long)]
    params: String,
    /// A custom parameter KEY=VALUE, as set in API送信設定; repeatable.
    #[arg(long = "param", value_parser = key_value)]
    custom: Vec<(String, String)>,
    /// A PEM certificate to trust besides the system's (e.g. the relay's self-signed one).
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = match cli.command {
        Some(Command::Send(send)) => runtime.block_on(send_one(send)),
        None => runtime.block_on(serve(cli.serve)),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("smaregi-sim: {message}");
            ExitCode::from(1)
        }
    }
}

async fn serve(args: Serve) -> Result<ExitCode, String> {
    let (Some(contract_id), Some(access_token)) = (args.contract_id, args.access_token) else {
        return Err("--contract-id and --access-token are required to serve".into());
    };
    let config = SimConfig {
        listen: args.listen,
        contract_id,
        access_token,
        tls: args.tls_cert.zip(args.tls_key),
        state_file: args.state_file,
        rate_limit_per_second: args.rate_limit,
    };
    let simulator = Simulator::start(config).await.map_err(|e| e.to_string())?;
    // Scripts read the address from this line.
    println!("listening on {}", simulator.url());
    tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
    simulator.stop().await;
    Ok(ExitCode::SUCCESS)
}

async fn send_one(args: Send) -> Result<ExitCode, String> {
    let params: serde_json::Value =
        serde_json::from_str(&args.params).map_err(|e| format!("--params is not JSON: {e}"))?;
    let sender = Sender::new(args.ca_file.as_deref()).map_err(|e| e.to_string())?;
    let (status, body) = sender
        .send(&args.url, &args.proc_name, &params, &args.custom)
        .await
        .map_err(|e| e.to_string())?;
    println!("{status} {body}");
    Ok(if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
