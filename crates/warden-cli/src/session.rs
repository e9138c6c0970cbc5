//! `warden session show|verify|export|revoke` and `warden sessions`: what an investigator does
//! with recorded sessions, all through the state service's admin API (verify and export files
//! aside). Kept out of main.rs so that it is only argument parsing and dispatch, as the policy
//! commands (policy/) and replay (replay.rs) are kept out of it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use warden_core::wire::{SessionHead, SessionList, SessionSummary, SessionView};
use warden_log::{KeyRing, LaterCheckpoint, SessionEvidence};

use crate::client::{self, Client};
use crate::{evidence, time};

/// Which sessions, when none are named: by subject, credential, workload and time.
#[derive(clap::Args, Clone, Default)]
pub struct Selection {
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
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// The session's timeline: who or what acted, when, with which credential, under which decision.
    Show { id: String },
    /// Check the trail's hash chain, and with --key its evidence in the log; exits 1 and names
    /// what is wrong.
    Verify {
        /// The session (optional with --file: every session in the file).
        id: Option<String>,
        /// Verify offline, from a `warden session export` file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The log's public verifier key (`<name>+<id>+<base64>`, or a file holding one): also
        /// check each record's inclusion proof, the signed checkpoint and the signed session
        /// head. Repeat for rotated keys.
        #[arg(long)]
        key: Vec<String>,
        /// A later checkpoint of the log (`warden log consistency`, or a witness's state
        /// file): also check that it extends the checkpoint each session was proven against,
        /// so a log rewritten since the export is named. Needs --key.
        #[arg(long, requires = "key")]
        later: Option<PathBuf>,
    },
    /// Write sessions with their trails as JSON Lines (for replay and offline verify).
    Export {
        ids: Vec<String>,
        #[command(flatten)]
        select: Selection,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke the session: every proxy refuses it from now on.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// The commands that need the service get a client from `connect`, only when they need one:
/// `verify --file` works offline, without a token.
pub fn run(command: SessionCommand, connect: &dyn Fn() -> Result<Client, String>, json: bool) -> Result<ExitCode, String> {
    match command {
        SessionCommand::Show { id } => {
            let view: SessionView = connect()?.get(&format!("/v1/sessions/{}", client::escape(&id)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?);
            } else {
                print_timeline(&view);
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Verify { id, file, key, later } => {
            let keys = if key.is_empty() { None } else { Some(key_ring(&key)?) };
            let later = match &later {
                Some(p) => Some(evidence::read_later(&std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?)?),
                None => None,
            };
            // Each session with its raw JSON and evidence, from the file or from the service.
            let sessions: Vec<(SessionView, Option<serde_json::Value>, Option<SessionEvidence>)> = match (&file, &id) {
                (Some(f), _) => {
                    let text = std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
                    evidence::read(&text)?
                        .into_iter()
                        .filter(|(v, _)| id.as_ref().is_none_or(|id| &v.id == id))
                        .map(|(v, raw)| {
                            let ev = raw.get("evidence").and_then(|e| serde_json::from_value(e.clone()).ok());
                            (v, Some(raw), ev)
                        })
                        .collect()
                }
                (None, Some(id)) => {
                    let client = connect()?;
                    let (view, ev) = if keys.is_some() {
                        let (view, ev) = with_evidence(&client, id)?;
                        (view, Some(ev.ok_or("the service has no log key: its evidence cannot be checked")?))
                    } else {
                        (client.get::<SessionView>(&format!("/v1/sessions/{}", client::escape(id)))?, None)
                    };
                    vec![(view, None, ev)]
                }
                (None, None) => return Err("name a session, or pass --file with an export".into()),
            };
            if sessions.is_empty() {
                return Err("no such session in the file".into());
            }
            let mut code = ExitCode::SUCCESS;
            for (view, raw, ev) in &sessions {
                if !verify_one(view, raw.as_ref(), ev.as_ref(), keys.as_ref(), later.as_ref(), json) {
                    code = ExitCode::from(1);
                }
            }
            Ok(code)
        }
        SessionCommand::Export { ids, select, out } => {
            let client = connect()?;
            let ids = if ids.is_empty() { search(&client, &select)?.into_iter().map(|s| s.id).collect() } else { ids };
            let mut text = String::new();
            let mut unproven = 0;
            for id in &ids {
                let (view, ev) = with_evidence(&client, id)?;
                if ev.is_none() {
                    unproven += 1;
                }
                let mut line = serde_json::to_value(&view).map_err(|e| e.to_string())?;
                if let (Some(ev), serde_json::Value::Object(m)) = (&ev, &mut line) {
                    m.insert("evidence".into(), serde_json::to_value(ev).map_err(|e| e.to_string())?);
                }
                text.push_str(&serde_json::to_string(&line).map_err(|e| e.to_string())?);
                text.push('\n');
            }
            if unproven > 0 {
                eprintln!("warning: the service has no log key: {unproven} session(s) exported without evidence (only their chains can be verified)");
            }
            match out {
                Some(path) => {
                    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                    eprintln!("exported {} session(s) to {}", ids.len(), path.display());
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionCommand::Revoke { id, reason } => {
            let body = serde_json::json!({"reason": reason});
            let answer: serde_json::Value = connect()?.post(&format!("/v1/sessions/{}/revoke", client::escape(&id)), &body)?;
            if json {
                println!("{answer}");
            } else if answer["changed"].as_bool() == Some(false) {
                println!("session {id} was already revoked");
            } else {
                println!("session {id} revoked");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `warden sessions`: the sessions the selection finds, one line each.
pub fn list(client: &Client, select: &Selection, json: bool) -> Result<ExitCode, String> {
    let list = SessionList { sessions: search(client, select)? };
    if json {
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

/// The sessions a selection finds: `sessions` lists them, `export` and `replay` use them when
/// no session is named.
pub fn search(client: &Client, select: &Selection) -> Result<Vec<SessionSummary>, String> {
    let now = time::now_ms();
    let mut q = vec![format!("limit={}", select.limit)];
    for (k, v) in [("subject", &select.subject), ("credential", &select.credential), ("workload", &select.workload)] {
        if let Some(v) = v {
            q.push(format!("{k}={}", client::escape(v)));
        }
    }
    if let Some(s) = &select.since {
        q.push(format!("since_ms={}", time::parse_when(s, now)?));
    }
    if let Some(u) = &select.until {
        q.push(format!("until_ms={}", time::parse_when(u, now)?));
    }
    Ok(client.get::<SessionList>(&format!("/v1/sessions?{}", q.join("&")))?.sessions)
}

/// How many records a session's evidence covers: its signed head's count (the leaves' count
/// when the head does not parse; verification then says why).
fn covered(ev: &SessionEvidence) -> usize {
    ev.head
        .split("\n\n")
        .next()
        .and_then(|t| warden_log::SessionHead::parse(&format!("{t}\n")).ok())
        .map(|h| h.records as usize)
        .unwrap_or(ev.leaves.len())
}

/// A session and its evidence (`None` when the service has no log key). The trail is read
/// first, then the evidence, whose checkpoint is signed after: every record read must be in it,
/// so a record the trail has beyond the signed head was never logged and stays to be named.
/// Records appended between the two reads are left out, for the next export.
fn with_evidence(client: &Client, id: &str) -> Result<(SessionView, Option<SessionEvidence>), String> {
    let path = client::escape(id);
    let view: SessionView = client.get(&format!("/v1/sessions/{path}"))?;
    let Some(ev) = client.get_optional::<SessionEvidence>(&format!("/v1/log/proof/session/{path}"))? else { return Ok((view, None)) };
    let head = covered(&ev);
    if view.timeline.len() >= head {
        return Ok((view, Some(ev)));
    }
    let mut again: SessionView = client.get(&format!("/v1/sessions/{path}"))?;
    again.timeline.truncate(head);
    // The export's head is what it covers: the signed head's records.
    again.head = again.timeline.last().map(|e| SessionHead { records: e.seq, hash: e.hash.clone() });
    Ok((again, Some(ev)))
}

/// `--key` values: verifier keys, or files holding them (one a line).
pub fn key_ring(keys: &[String]) -> Result<KeyRing, String> {
    let mut all = Vec::new();
    for k in keys {
        if k.contains('+') {
            all.push(k.clone());
        } else {
            let text = std::fs::read_to_string(k).map_err(|e| format!("--key {k}: neither a verifier key nor a readable file ({e})"))?;
            all.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
        }
    }
    KeyRing::new(&all).map_err(|e| format!("--key: {e}"))
}

/// Print the verdict on one trail; true if intact. With keys, the evidence is required and checked.
fn verify_one(
    view: &SessionView,
    raw: Option<&serde_json::Value>,
    ev: Option<&SessionEvidence>,
    keys: Option<&KeyRing>,
    later: Option<&LaterCheckpoint>,
    json: bool,
) -> bool {
    let id = &view.id;
    let chain = evidence::check_chain(view, raw);
    let proven = match (&chain, keys) {
        (Err(_), _) | (_, None) => None,
        (Ok(()), Some(keys)) => Some(match ev {
            Some(ev) => evidence::check(view, ev, keys).and_then(|p| match later {
                Some(later) => evidence::check_later(&ev.checkpoint, later, keys).map(|()| p),
                None => Ok(p),
            }),
            None => Err("no evidence to check against the key (exported from a service without a log key, or edited out)".to_string()),
        }),
    };
    let result = match (chain, proven) {
        (Err(e), _) | (Ok(()), Some(Err(e))) => Err(e),
        (Ok(()), Some(Ok(p))) => Ok(Some(p)),
        (Ok(()), None) => Ok(None),
    };
    let n = view.timeline.len();
    if json {
        let doc = match &result {
            Ok(p) => serde_json::json!({"session_id": id, "ok": true, "records": n, "tree_size": p.as_ref().map(|p| p.tree_size), "signed_by": p.as_ref().map(|p| &p.signed_by)}),
            Err(why) => serde_json::json!({"session_id": id, "ok": false, "why": why}),
        };
        println!("{doc}");
    } else {
        match &result {
            Ok(None) => println!("session {id}: trail intact ({n} records, chain verified)"),
            Ok(Some(p)) => println!(
                "session {id}: trail intact ({n} records, chain verified, every record in the log at the checkpoint of {} leaves signed by {})",
                p.tree_size,
                p.signed_by.join(", ")
            ),
            Err(why) => println!("session {id}: TRAIL BROKEN {why}"),
        }
    }
    result.is_ok()
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
