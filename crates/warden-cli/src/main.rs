//! `warden`: investigate governed sessions. Reads the session-state service's admin API.

mod client;
mod time;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warden_core::trail;
use warden_core::wire::{SessionList, SessionView};

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
        command: SessionCommand,
    },
    /// Find sessions.
    Sessions {
        #[arg(long)]
        subject: Option<String>,
        /// Credential fingerprint (`sha256:…`).
        #[arg(long)]
        credential: Option<String>,
        /// Workload SPIFFE ID.
        #[arg(long)]
        workload: Option<String>,
        /// Seen since: `15m`, `2h`, `7d`, or unix milliseconds.
        #[arg(long)]
        since: Option<String>,
        /// Started before: same forms as --since.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// The session's timeline: who or what acted, when, with which credential, under which decision.
    Show { id: String },
    /// Check the trail's hash chain; exits 1 and names the first bad step if it was altered.
    Verify { id: String },
    /// Revoke the session: every proxy refuses it from now on.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warden: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let token = cli.token.clone().ok_or("no admin token: set WARDEN_ADMIN_TOKEN or pass --token")?;
    let client = Client::new(&cli.url, &token);
    match cli.command {
        Command::Session { command: SessionCommand::Show { id } } => {
            let view: SessionView = client.get(&format!("/v1/sessions/{}", client::escape(&id)))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?);
            } else {
                print_timeline(&view);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Session { command: SessionCommand::Verify { id } } => {
            let view: SessionView = client.get(&format!("/v1/sessions/{}", client::escape(&id)))?;
            let result = trail::verify(&view.timeline);
            if cli.json {
                let doc = match &result {
                    Ok(()) => serde_json::json!({"session_id": id, "ok": true, "records": view.timeline.len()}),
                    Err(b) => serde_json::json!({"session_id": id, "ok": false, "seq": b.seq, "step": b.step, "why": b.why}),
                };
                println!("{doc}");
            }
            match result {
                Ok(()) => {
                    if !cli.json {
                        println!("session {id}: trail intact ({} records, chain verified)", view.timeline.len());
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(b) => {
                    if !cli.json {
                        println!("session {id}: TRAIL BROKEN at step {} (record {}): {}", b.step, b.seq, b.why);
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Session { command: SessionCommand::Revoke { id, reason } } => {
            let body = serde_json::json!({"reason": reason});
            let answer: serde_json::Value = client.post(&format!("/v1/sessions/{}/revoke", client::escape(&id)), &body)?;
            if cli.json {
                println!("{answer}");
            } else if answer["changed"].as_bool() == Some(false) {
                println!("session {id} was already revoked");
            } else {
                println!("session {id} revoked");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions { subject, credential, workload, since, until, limit } => {
            let now = time::now_ms();
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [("subject", subject), ("credential", credential), ("workload", workload)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", client::escape(&v)));
                }
            }
            if let Some(s) = since {
                q.push(format!("since_ms={}", time::parse_when(&s, now)?));
            }
            if let Some(u) = until {
                q.push(format!("until_ms={}", time::parse_when(&u, now)?));
            }
            let list: SessionList = client.get(&format!("/v1/sessions?{}", q.join("&")))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list).map_err(|e| e.to_string())?);
            } else {
                println!("{:<40} {:<32} {:>6}  {:<20} {:<20} REVOKED", "SESSION", "SUBJECT", "STEPS", "STARTED", "LAST SEEN");
                for s in &list.sessions {
                    println!(
                        "{:<40} {:<32} {:>6}  {:<20} {:<20} {}",
                        s.id,
                        s.subject,
                        s.steps,
                        time::format_ms(s.started_at_ms),
                        time::format_ms(s.last_seen_at_ms),
                        if s.revoked { "yes" } else { "" }
                    );
                }
                println!("{} session(s)", list.sessions.len());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_timeline(v: &SessionView) {
    let s = &v.state;
    println!("session   {}", v.id);
    println!("subject   {}", if s.subject.is_empty() { "(none yet)" } else { &s.subject });
    println!("started   {}    last seen {}    steps {}", time::format_ms(s.started_at_ms), time::format_ms(s.last_seen_at_ms), s.steps);
    if !s.credentials.is_empty() {
        println!("creds     {}", s.credentials.join(", "));
    }
    if !s.workloads.is_empty() {
        println!("workloads {}", s.workloads.join(", "));
    }
    if let Some(at) = v.revoked_at_ms {
        println!("REVOKED   {} ({})", time::format_ms(at), v.revoke_reason.as_deref().unwrap_or(""));
    }
    println!();
    println!(
        "{:>4}  {:<24} {:<20} {:<22} {:<28} {:<26} {:<10} {:<28} {:>5} {:>6}",
        "STEP", "TIME", "SUBJECT", "CREDENTIAL", "WORKLOAD", "ACTION", "DECISION", "REASONS", "RISK", "STATUS"
    );
    for e in &v.timeline {
        let r = &e.record;
        let action = format!("{} {}", r.method.as_deref().unwrap_or("-"), r.tool.as_deref().or(r.path.as_deref()).unwrap_or("-"));
        let mut decision = r.action.clone();
        if !r.enforced {
            decision.push_str(" (shadow)");
        }
        if r.degraded {
            decision.push_str(" (degraded)");
        }
        println!(
            "{:>4}  {:<24} {:<20} {:<22} {:<28} {:<26} {:<10} {:<28} {:>5} {:>6}",
            r.step,
            time::format_ms(r.at_ms),
            clip(&r.subject, 20),
            clip(r.credential.as_deref().unwrap_or("-"), 22),
            clip(r.workload.as_deref().unwrap_or("-"), 28),
            clip(&action, 26),
            clip(&decision, 10),
            clip(&if r.reasons.is_empty() { "-".to_string() } else { r.reasons.join(",") }, 28),
            r.risk,
            r.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    if !v.audit.is_empty() {
        println!();
        println!("audit events:");
        for a in &v.audit {
            println!("  {}  {:<22} by {:<24} {}", time::format_ms(a.at_ms), a.kind, a.subject, a.detail);
        }
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}
