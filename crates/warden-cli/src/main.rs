//! `warden`: investigate governed sessions. Reads the session-state service's admin API.
//! This file is the command line and the dispatch; each command group lives in its own module.

mod client;
mod evidence;
mod log;
mod policy;
mod profile;
mod replay;
mod session;
mod time;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// A subject's behavioural profile across its sessions: show it, reset it.
    Profile {
        #[command(subcommand)]
        command: profile::ProfileCommand,
    },
    /// Re-decide recorded sessions with a candidate policy and show what would change.
    Replay(replay::ReplayArgs),
    /// The append-only log over every record: witness it, make a witness key.
    Log {
        #[command(subcommand)]
        command: log::LogCommand,
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
        Command::Profile { command } => profile::run(command, &connect()?, cli.json),
        Command::Replay(args) => replay::run(args, &connect, cli.json),
        Command::Log { command } => log::run(command, &cli.url, cli.token.as_deref(), cli.json),
        Command::Policy { command } => Ok(policy::run(command)),
    }
}
