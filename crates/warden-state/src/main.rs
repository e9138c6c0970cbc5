use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use warden_state::sqlite::SqliteStore;
use warden_state::{app, AppState};

/// The Session Warden session-state service.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, env = "WARDEN_STATE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// SQLite database file (created if missing).
    #[arg(long, env = "WARDEN_STATE_DB", default_value = "warden-state.db")]
    db: PathBuf,
    /// Token the proxies present (Authorization: Bearer …).
    #[arg(long, env = "WARDEN_PROXY_TOKEN", hide_env_values = true)]
    proxy_token: Option<String>,
    /// Token for admin calls (read trails, revoke).
    #[arg(long, env = "WARDEN_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

fn main() {
    // Warnings and errors by default (a store failure must never be silent); RUST_LOG=info for more.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run() {
        eprintln!("warden-state: {e}");
        std::process::exit(1);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn run() -> Result<(), String> {
    let args = Args::parse();
    let (Some(proxy), Some(admin)) = (args.proxy_token, args.admin_token) else {
        return Err("set both WARDEN_PROXY_TOKEN and WARDEN_ADMIN_TOKEN (or --proxy-token / --admin-token): the API is never open".into());
    };
    if proxy.len() < 16 || admin.len() < 16 || proxy == admin {
        return Err("tokens must be at least 16 characters and the proxy and admin tokens must differ".into());
    }
    let store = SqliteStore::open(&args.db).map_err(|e| e.to_string())?;
    let state = Arc::new(AppState::new(Arc::new(store), &proxy, &admin));
    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("warden-state listening on {addr} (db {})", args.db.display());
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| e.to_string())
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
