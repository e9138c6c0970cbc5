//! `warden log witness` and `warden log keygen`: watch the service's append-only log from the
//! outside. A witness keeps the last checkpoint it accepted and accepts the next only with a
//! consistency proof that the log grew from it, so a log that forked (two trees for one size),
//! went backwards (a database rolled back) or was rewritten is refused; it can co-sign what it
//! accepted (C2SP tlog-cosignature), so a verifier can ask for checkpoints others have seen.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use warden_log::{ConsistencyProof, Cosigner, KeyRing, LaterCheckpoint, VerifiedCheckpoint};

use crate::client::Client;

#[derive(Subcommand)]
pub enum LogCommand {
    /// Fetch the log's checkpoint and accept it only if it extends the last one accepted (kept
    /// in --state); exit 1 naming a fork, a rollback or a bad signature. Run it from cron or CI.
    Witness {
        /// The file holding the last accepted checkpoint (created on the first run).
        #[arg(long)]
        state: PathBuf,
        /// The log's verifier key (`<name>+<id>+<base64>`, or a file holding it); repeat for rotated keys.
        #[arg(long, required = true)]
        key: Vec<String>,
        /// Co-sign accepted checkpoints with this witness key (`warden log keygen`).
        #[arg(long)]
        cosign_key: Option<PathBuf>,
        /// Write the co-signed checkpoint here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The service's log token (read-only: checkpoints and consistency proofs); the admin
        /// token works too.
        #[arg(long, env = "WARDEN_LOG_TOKEN", hide_env_values = true)]
        log_token: Option<String>,
    },
    /// Fetch the log's latest checkpoint with consistency proofs from the checkpoints an
    /// export's evidence was proven against, for `warden session verify --file EXPORT --later`.
    Consistency {
        /// The export (`warden session export`).
        #[arg(long)]
        file: PathBuf,
        /// The log's verifier key; repeat for rotated keys.
        #[arg(long, required = true)]
        key: Vec<String>,
        /// Write it here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The service's log token (the admin token works too).
        #[arg(long, env = "WARDEN_LOG_TOKEN", hide_env_values = true)]
        log_token: Option<String>,
    },
    /// Make a witness key: the private key to --out (mode 0600, never overwritten), the public
    /// verifier key (type 0x04, tlog-cosignature) printed.
    Keygen {
        /// The witness's name (e.g. `witness.example.com/w1`).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: LogCommand, url: &str, admin_token: Option<&str>, json: bool) -> Result<ExitCode, String> {
    match command {
        LogCommand::Keygen { name, out } => {
            let (skey, vkey) = warden_log::generate_cosigner_key(&name).map_err(|e| e.0)?;
            write_new_secret(&out, &skey)?;
            println!("{vkey}");
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Consistency { file, key, out, log_token } => {
            let token = log_token.as_deref().or(admin_token).ok_or("no token: set WARDEN_LOG_TOKEN (or the admin token)")?;
            let ring = crate::session::key_ring(&key)?;
            let later = consistency(&Client::new(url, token), &ring, &file)?;
            let text = serde_json::to_string_pretty(&later).map_err(|e| e.to_string())? + "\n";
            match &out {
                Some(p) => std::fs::write(p, &text).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
                None => print!("{text}"),
            }
            eprintln!("later checkpoint: {} proof(s) to it", later.proofs.len());
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Witness { state, key, cosign_key, out, log_token } => {
            let token = log_token.as_deref().or(admin_token).ok_or("no token: set WARDEN_LOG_TOKEN (or the admin token)")?;
            let ring = crate::session::key_ring(&key)?;
            let client = Client::new(url, token);
            match witness(&client, &ring, &state)? {
                Err(why) => {
                    report(json, false, &why);
                    Ok(ExitCode::from(1))
                }
                Ok((cp, what)) => {
                    if let Some(k) = cosign_key {
                        let text = std::fs::read_to_string(&k).map_err(|e| format!("cannot read {}: {e}", k.display()))?;
                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                        let cosigned = Cosigner::new(&text, now).and_then(|c| c.cosign(&cp.note)).map_err(|e| e.0)?;
                        match &out {
                            Some(p) => std::fs::write(p, &cosigned).map_err(|e| format!("cannot write {}: {e}", p.display()))?,
                            None => print!("{cosigned}"),
                        }
                    }
                    report(json, true, &what);
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

fn report(json: bool, ok: bool, what: &str) {
    if json {
        eprintln!("{}", serde_json::json!({"ok": ok, "why": what}));
    } else if ok {
        eprintln!("witness: {what}");
    } else {
        eprintln!("witness: REFUSED: {what}");
    }
}

/// The outer error is the witness's own trouble (unreachable service, unreadable state); the
/// inner one is a refusal of the log. The state moves only to an accepted checkpoint.
fn witness(client: &Client, ring: &KeyRing, state: &Path) -> Result<Result<(VerifiedCheckpoint, String), String>, String> {
    let note = client.get_text("/v1/log/checkpoint")?;
    let new = match ring.verify_checkpoint(&note) {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("the log's checkpoint does not verify: {e}"))),
    };
    let old = match std::fs::read_to_string(state) {
        Ok(text) => Some(ring.verify_checkpoint(&text).map_err(|e| format!("the state file {} does not hold a checkpoint of this log: {e}", state.display()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", state.display())),
    };
    let what = match &old {
        None => format!("accepted the first checkpoint: {} leaves, root {}", new.size, new.root),
        Some(old) => {
            if old.origin != new.origin {
                return Ok(Err(format!("the checkpoint is of the log {:?}, the state of {:?}", new.origin, old.origin)));
            }
            let proof = if new.size > old.size {
                let p: ConsistencyProof = client.get(&format!("/v1/log/proof/consistency?from={}&to={}", old.size, new.size))?;
                warden_log::decode(&p.proof).map_err(|e| e.0)?
            } else {
                Vec::new()
            };
            if let Err(e) = warden_log::check_consistency(&proof, old.size, old.root, new.size, new.root) {
                return Ok(Err(format!("{e} (last accepted: {} leaves, root {}; now: {} leaves, root {})", old.size, old.root, new.size, new.root)));
            }
            format!("accepted {} leaves, root {}: consistent with the {} accepted before", new.size, new.root, old.size)
        }
    };
    let tmp = state.with_extension("tmp");
    std::fs::write(&tmp, &note).and_then(|()| std::fs::rename(&tmp, state)).map_err(|e| format!("cannot write {}: {e}", state.display()))?;
    Ok(Ok((new, what)))
}

/// The latest checkpoint and a consistency proof to it from each checkpoint size the export's
/// evidence was proven at (each verified with the keys first: a forged one is not extended).
fn consistency(client: &Client, ring: &KeyRing, export: &Path) -> Result<LaterCheckpoint, String> {
    let text = std::fs::read_to_string(export).map_err(|e| format!("cannot read {}: {e}", export.display()))?;
    let mut sizes = std::collections::BTreeSet::new();
    for (view, raw) in crate::evidence::read(&text)? {
        let Some(ev) = raw.get("evidence").and_then(|e| serde_json::from_value::<warden_log::SessionEvidence>(e.clone()).ok()) else { continue };
        let cp = ring.verify_checkpoint(&ev.checkpoint).map_err(|e| format!("session {}: its checkpoint does not verify: {e}", view.id))?;
        sizes.insert(cp.size);
    }
    let note = client.get_text("/v1/log/checkpoint")?;
    let latest = ring.verify_checkpoint(&note).map_err(|e| format!("the log's checkpoint does not verify: {e}"))?;
    let mut proofs = Vec::new();
    for from in sizes.into_iter().filter(|s| *s < latest.size) {
        proofs.push(client.get::<ConsistencyProof>(&format!("/v1/log/proof/consistency?from={from}&to={}", latest.size))?);
    }
    Ok(LaterCheckpoint { checkpoint: note, proofs })
}

/// A secret key file: created, never overwritten, readable by its owner only.
fn write_new_secret(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(format!("{text}\n").as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}
