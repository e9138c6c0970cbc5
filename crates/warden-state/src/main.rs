use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use warden_log::LogSigner;
use warden_state::redis::{self, RedisStore};
use warden_state::sqlite::SqliteStore;
use warden_state::{app, AppState};

/// The Session Warden session-state service.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "WARDEN_STATE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// SQLite database file (created if missing), when --store is not given.
    #[arg(long, env = "WARDEN_STATE_DB", default_value = "warden-state.db")]
    db: PathBuf,
    /// The store: `sqlite:PATH`, or Redis shared by many replicas: `redis://[user:pass@]host:port[/db]`,
    /// `rediss://…` (TLS), `redis+cluster://h1:p1,h2:p2` (Redis Cluster; `rediss+cluster://` with
    /// TLS). Without it: SQLite at --db.
    #[arg(long, env = "WARDEN_STATE_STORE")]
    store: Option<String>,
    /// Token the proxies present (Authorization: Bearer …).
    #[arg(long, env = "WARDEN_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: Option<String>,
    /// Token for admin calls (read trails, revoke).
    #[arg(long, env = "WARDEN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The log's signing key file (`warden-state keygen`); repeat to sign with several while
    /// rotating (the first names the log). Without one the log is kept but nothing is signed.
    #[arg(long, env = "WARDEN_LOG_KEY_FILE", value_delimiter = ',')]
    log_key: Vec<PathBuf>,
    /// Token a witness presents to read checkpoints and consistency proofs (and nothing else).
    #[arg(long, env = "WARDEN_LOG_TOKEN", hide_env_values = true)]
    log_token: Option<String>,
    /// Sign a checkpoint this often (seconds) when the log has grown.
    #[arg(long, env = "WARDEN_CHECKPOINT_INTERVAL", default_value_t = 10)]
    checkpoint_interval: u64,
    /// Threads serving requests: 0 runs everything on one thread (tokio's current-thread
    /// runtime: requests that arrive together reach the store together, so the Redis store sends
    /// them in one write); unset, one per CPU this process may use, and one thread when that is
    /// a single CPU.
    #[arg(long, env = "WARDEN_STATE_WORKERS")]
    workers: Option<usize>,
    #[command(flatten)]
    ssf: SsfArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Shared Signals (SSF 1.0 / CAEP 1.0): receive Security Event Tokens that revoke sessions,
/// transmit one for every revocation.
#[derive(clap::Args)]
struct SsfArgs {
    /// Receive SETs from this transmitter (its `iss`), pushed to POST /v1/ssf/events (RFC 8935).
    #[arg(long, env = "WARDEN_SSF_RECEIVER_ISSUER", requires_all = ["ssf_receiver_audience", "ssf_receiver_jwks"])]
    ssf_receiver_issuer: Option<String>,
    /// The `aud` the transmitter's SETs must name: this receiver.
    #[arg(long, env = "WARDEN_SSF_RECEIVER_AUDIENCE")]
    ssf_receiver_audience: Option<String>,
    /// The transmitter's public keys (a JWKS file).
    #[arg(long, env = "WARDEN_SSF_RECEIVER_JWKS")]
    ssf_receiver_jwks: Option<PathBuf>,
    /// A pushing transmitter must also present this bearer token.
    #[arg(long, env = "WARDEN_SSF_PUSH_TOKEN", hide_env_values = true)]
    ssf_push_token: Option<String>,
    /// Poll the transmitter for SETs (RFC 8936) at this URL, every 2 seconds.
    #[arg(long, env = "WARDEN_SSF_POLL_URL", requires = "ssf_receiver_issuer")]
    ssf_poll_url: Option<String>,
    /// The bearer token for polling.
    #[arg(long, env = "WARDEN_SSF_POLL_TOKEN", hide_env_values = true)]
    ssf_poll_token: Option<String>,
    /// Transmit a CAEP session-revoked SET for every revocation, signed with this P-256 key (PEM).
    #[arg(long, env = "WARDEN_SSF_TRANSMITTER_KEY", requires = "ssf_transmitter_issuer")]
    ssf_transmitter_key: Option<PathBuf>,
    /// The transmitter's `iss`.
    #[arg(long, env = "WARDEN_SSF_TRANSMITTER_ISSUER")]
    ssf_transmitter_issuer: Option<String>,
    /// A receiver's push endpoint; repeat for several. Its audience is --ssf-transmit-audience,
    /// else the URL itself.
    #[arg(long, env = "WARDEN_SSF_TRANSMIT_TO", value_delimiter = ',')]
    ssf_transmit_to: Vec<String>,
    #[arg(long, env = "WARDEN_SSF_TRANSMIT_AUDIENCE")]
    ssf_transmit_audience: Option<String>,
    /// The bearer token the receivers expect.
    #[arg(long, env = "WARDEN_SSF_TRANSMIT_TOKEN", hide_env_values = true)]
    ssf_transmit_token: Option<String>,
}

/// The receiver's trust and the transmitter, from the arguments; their background tasks started.
fn shared_signals(a: &SsfArgs, store: &Arc<dyn warden_state::store::Store>) -> Result<(Option<Arc<warden_core::ssf::Receiver>>, Option<serde_json::Value>), String> {
    use warden_state::ssf;
    let receiver = match (&a.ssf_receiver_issuer, &a.ssf_receiver_audience, &a.ssf_receiver_jwks) {
        (Some(issuer), Some(audience), Some(jwks)) => {
            let text = std::fs::read_to_string(jwks).map_err(|e| format!("cannot read the SSF transmitter's JWKS {}: {e}", jwks.display()))?;
            let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", jwks.display()))?;
            let algs = ["RS256", "ES256", "EdDSA"].map(String::from);
            let (keys, _) = warden_core::identity::jwks::parse_jwks(&doc, &algs).map_err(|e| format!("{}: {e}", jwks.display()))?;
            let r = Arc::new(warden_core::ssf::Receiver { issuer: issuer.clone(), audience: audience.clone(), keys, max_age_seconds: 3600 });
            if let Some(url) = &a.ssf_poll_url {
                tokio::spawn(ssf::poll(store.clone(), r.clone(), url.clone(), a.ssf_poll_token.clone(), std::time::Duration::from_secs(2)));
            }
            eprintln!("warden-state: receiving Shared Signals from {issuer} (POST /v1/ssf/events{})", if a.ssf_poll_url.is_some() { ", and polling" } else { "" });
            Some(r)
        }
        _ => None,
    };
    let jwks = match (&a.ssf_transmitter_key, &a.ssf_transmitter_issuer) {
        (Some(key), Some(issuer)) => {
            let pem = std::fs::read_to_string(key).map_err(|e| format!("cannot read the SSF signing key {}: {e}", key.display()))?;
            let tx = Arc::new(ssf::Transmitter::from_pem(issuer, &pem)?);
            let jwks = tx.jwks();
            let to: Vec<ssf::Destination> = a
                .ssf_transmit_to
                .iter()
                .map(|url| ssf::Destination { url: url.clone(), audience: a.ssf_transmit_audience.clone().unwrap_or_else(|| url.clone()), token: a.ssf_transmit_token.clone() })
                .collect();
            eprintln!("warden-state: transmitting session-revoked SETs as {issuer} (key {}) to {} receiver(s)", tx.kid, to.len());
            tokio::spawn(ssf::transmit(store.clone(), tx, to, std::time::Duration::from_millis(500)));
            Some(jwks)
        }
        _ => None,
    };
    Ok((receiver, jwks))
}

#[derive(Subcommand)]
enum Command {
    /// Copy everything of one store into another (e.g. a SQLite file into Redis): sessions,
    /// records (bodies and hashes unchanged), audit events, revocations, credential subjects and
    /// the log (the same leaves in the same order, so earlier checkpoints stay consistent).
    Migrate {
        /// `sqlite:PATH`
        #[arg(long)]
        from: String,
        /// `redis://…`, `rediss://…` or `redis+cluster://…`; must hold no Session Warden data yet.
        #[arg(long)]
        to: String,
    },
    /// Make a log signing key: writes the private key to --out (mode 0600, never overwritten)
    /// and prints the public verifier key (`<name>+<id>+<base64>`) to give to verifiers.
    Keygen {
        /// The log's name, its checkpoints' origin line (e.g. `warden.example.com/log`).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn keygen(name: &str, out: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (skey, vkey) = warden_log::generate_log_key(name).map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    f.write_all(format!("{skey}\n").as_bytes()).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("{vkey}");
    Ok(())
}

/// The signing keys, from their files. Their contents are never printed or logged.
fn log_signer(paths: &[PathBuf]) -> Result<Option<LogSigner>, String> {
    if paths.is_empty() {
        return Ok(None);
    }
    let texts = paths
        .iter()
        .map(|p| std::fs::read_to_string(p).map_err(|e| format!("cannot read the log key {}: {e}", p.display())))
        .collect::<Result<Vec<_>, _>>()?;
    LogSigner::from_keys(&texts).map(Some).map_err(|e| format!("log key: {e}"))
}

fn main() {
    // Warnings and errors by default (a store failure must never be silent); RUST_LOG=info for more.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let runtime = match args.workers {
        Some(0) => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
        None if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) == 1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        None => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    let result = runtime.map_err(|e| format!("cannot start the runtime: {e}")).and_then(|rt| rt.block_on(run(args)));
    if let Err(e) = result {
        eprintln!("warden-state: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    match &args.command {
        Some(Command::Keygen { name, out }) => return keygen(name, out),
        Some(Command::Migrate { from, to }) => return warden_state::migrate::run(from, to).await,
        None => {}
    }
    let (Some(proxy), Some(admin)) = (args.proxy_token, args.admin_token) else {
        return Err("set both WARDEN_PROXY_TOKEN and WARDEN_ADMIN_TOKEN (or --proxy-token / --admin-token): the API is never open".into());
    };
    if proxy.len() < 16 || admin.len() < 16 || proxy == admin {
        return Err("tokens must be at least 16 characters and the proxy and admin tokens must differ".into());
    }
    if let Some(t) = &args.log_token {
        if t.len() < 16 || *t == proxy || *t == admin {
            return Err("the log token must be at least 16 characters and differ from the proxy and admin tokens".into());
        }
    }
    let signer = log_signer(&args.log_key)?.map(Arc::new);
    let (store, described): (Arc<dyn warden_state::store::Store>, String) = match args.store.as_deref() {
        Some(url) if redis::is_redis_url(url) => {
            (Arc::new(RedisStore::connect(url).await.map_err(|e| e.to_string())?), format!("store {}", redis::redacted(url)))
        }
        Some(other) => {
            let Some(path) = other.strip_prefix("sqlite:") else {
                return Err(format!("--store {other:?}: expected sqlite:PATH, redis://…, rediss://… or redis+cluster://h1:p1,h2:p2"));
            };
            (Arc::new(SqliteStore::open(std::path::Path::new(path)).map_err(|e| e.to_string())?), format!("db {path}"))
        }
        None => (Arc::new(SqliteStore::open(&args.db).map_err(|e| e.to_string())?), format!("db {}", args.db.display())),
    };
    match &signer {
        Some(s) => {
            eprintln!("warden-state: log {} signed by {}", s.origin(), s.verifier_keys().join(" "));
            tokio::spawn(checkpoints(store.clone(), s.clone(), args.checkpoint_interval.max(1)));
        }
        None => eprintln!("warden-state: no --log-key: the log is kept but no checkpoint is signed"),
    }
    let (receiver, ssf_jwks) = shared_signals(&args.ssf, &store)?;
    let state = Arc::new(
        AppState::new(store, &proxy, &admin).with_log(signer, args.log_token.as_deref()).with_ssf(receiver, args.ssf.ssf_push_token.as_deref(), ssf_jwks),
    );
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("warden-state listening on {addr} ({described})");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| e.to_string())
}

/// A checkpoint on a period, when the log has grown. A refusal (the database no longer extends
/// the last checkpoint) is logged each time: it needs an operator.
async fn checkpoints(store: Arc<dyn warden_state::store::Store>, signer: Arc<LogSigner>, every_s: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(every_s));
    loop {
        tick.tick().await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        if let Err(e) = store.log_checkpoint(signer.clone(), now).await {
            log::error!("checkpoint: {e}");
            eprintln!("warden-state: checkpoint: {e}");
        }
    }
}

/// SIGINT or SIGTERM: stop accepting, finish what is in flight.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
