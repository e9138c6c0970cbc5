//! `warden`: investigate governed sessions. Reads the session-state service's admin API.

mod client;
mod policy;
mod replay;
mod session;
mod time;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warden_core::policy::dir::PolicyDir;
use warden_core::policy::DEFAULT_ENTRYPOINT;
use warden_core::wire::SessionView;

use client::Client;

#[derive(Parser)]
#[command(name = "warden", version, about = "Investigate, verify and revoke governed sessions")]
struct Cli {
    /// Base URL of the session-state service.
    #[arg(long, global = true, env = "WARDEN_STATE_URL", default_value = "http://127.0.0.1:7070")]
    url: String,
    /// The service's admin token.
    #[arg(long, global = true, env = "WARDEN_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One session.
    Session {
        #[command(subcommand)]
        command: session::SessionCommand,
    },
    /// Find sessions.
    Sessions {
        #[command(flatten)]
        select: session::Selection,
    },
    /// Re-decide recorded sessions with a candidate policy and show what would change.
    Replay {
        /// Directory of the candidate policy (`*.rego` and `data.json`).
        #[arg(long)]
        policy: PathBuf,
        #[arg(long, default_value = DEFAULT_ENTRYPOINT)]
        entrypoint: String,
        /// Sessions exported with `warden session export` (else they are read from the service).
        #[arg(long)]
        file: Option<PathBuf>,
        /// A session to replay (repeatable); without it, the selection flags choose them.
        #[arg(long = "session")]
        sessions: Vec<String>,
        #[command(flatten)]
        select: session::Selection,
        /// Exit 1 when any step would be decided differently (for CI).
        #[arg(long)]
        fail_on_change: bool,
    },
    /// Test, evaluate and check a policy directory on the proxy's own engine set-up.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::parse() {
        // Local: no state service, no token.
        Cli { command: Command::Policy { command }, .. } => return policy::run(command),
        cli => cli,
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    // Asked for only by the commands that reach the service, so offline ones need no token.
    let connect = || -> Result<Client, String> {
        let token = cli.token.clone().ok_or("no admin token: set WARDEN_ADMIN_TOKEN or pass --token")?;
        Ok(Client::new(&cli.url, &token))
    };
    match cli.command {
        Command::Session { command } => session::run(command, &connect, cli.json),
        Command::Sessions { select } => session::list(&connect()?, &select, cli.json),
        Command::Replay { policy, entrypoint, file, sessions, select, fail_on_change } => {
            // Test modules are left out, as the proxy leaves them out.
            let mut candidate = PolicyDir::load(&policy).map_err(|e| e.0)?.compile(&entrypoint).map_err(|e| e.0)?;
            let version = candidate.version.clone();
            let views: Vec<SessionView> = match file {
                Some(f) => replay::read_export(&std::fs::read_to_string(&f).map_err(|e| format!("cannot read {}: {e}", f.display()))?)?,
                None => {
                    let client = connect()?;
                    let ids = if sessions.is_empty() {
                        session::search(&client, &select)?.into_iter().map(|s| s.id).collect()
                    } else {
                        sessions
                    };
                    ids.iter().map(|id| client.get(&format!("/v1/sessions/{}", client::escape(id)))).collect::<Result<_, _>>()?
                }
            };
            let report = replay::replay(&mut candidate, &views);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
            } else {
                replay::print(&report, &version);
            }
            Ok(if fail_on_change && !report.changes.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Policy { command } => Ok(policy::run(command)),
    }
}
