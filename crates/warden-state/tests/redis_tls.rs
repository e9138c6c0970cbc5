//! `rediss://`: the service reaches a redis-server (Debian's is built with TLS) over TLS, trusting
//! a private CA given the way redis-rs's rustls reads its roots (the system's, or the PEM file
//! named by `SSL_CERT_FILE`, which then replaces them). The CA and the server's certificate are
//! made by the test with `openssl`; the service is the real binary. A service given another CA
//! refuses the server: it is not ready and a begin-step fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROXY: &str = "proxy-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): install Debian's openssl"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<name>.crt`, `<name>.key`) in `dir`.
fn ca(dir: &Path, name: &str) {
    openssl(dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}.key"), "-out", &format!("{name}.crt"), "-days", "1", "-subj", &format!("/CN={name}")]);
}

/// The server's key and certificate for 127.0.0.1 and localhost, signed by CA `ca`.
fn server_cert(dir: &Path, ca: &str) {
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(dir, &[
        "x509", "-req", "-in", "server.csr", "-CA", &format!("{ca}.crt"), "-CAkey", &format!("{ca}.key"), "-CAcreateserial", "-out", "server.crt", "-days", "1",
        "-extfile", "ext.cnf",
    ]);
}

struct Service {
    child: Child,
    port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service(store: &str, roots: &Path) -> Service {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden-state"))
        .args(["--listen", "127.0.0.1:0", "--store", store])
        .env("WARDEN_PROXY_TOKEN", PROXY)
        .env("WARDEN_ADMIN_TOKEN", ADMIN)
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port = line.split("127.0.0.1:").nth(1).and_then(|r| r.split(' ').next()).and_then(|p| p.parse().ok());
    let port = port.unwrap_or_else(|| panic!("warden-state did not start: {line:?}"));
    Service { child, port }
}

/// One HTTP/1.1 request; the status and body.
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PROXY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn readyz_within(port: u16, want: u16, within: Duration) -> u16 {
    let deadline = Instant::now() + within;
    loop {
        let (s, _) = http(port, "GET", "/readyz", None);
        if s == want || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rediss_reaches_a_tls_redis_trusting_the_ca_given_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    ca(dir.path(), "ca");
    ca(dir.path(), "other");
    server_cert(dir.path(), "ca");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let redis = support::RedisServer::start_with(&[
        "--save", "", "--appendonly", "no", "--tls-port", &tls_port, "--tls-cert-file", &p("server.crt"), "--tls-key-file", &p("server.key"),
        "--tls-ca-cert-file", &p("ca.crt"), "--tls-auth-clients", "no",
    ]);
    let begin = r#"{"session_id":"tls-1","subject":"agent-7","credential":"sha256:00ff"}"#;
    for host in ["127.0.0.1", "localhost"] {
        let store = format!("rediss://{host}:{tls_port}");
        let svc = service(&store, &dir.path().join("ca.crt"));
        assert_eq!(readyz_within(svc.port, 200, Duration::from_secs(10)), 200, "{store}: not ready over TLS");
        let (s, body) = http(svc.port, "POST", "/v1/steps/begin", Some(begin));
        assert_eq!(s, 200, "{store}: {body}");
        assert!(body.contains(r#""outcome":"ok""#), "{body}");
    }
    // The steps went to the TLS server (the plain port is the same server).
    assert_eq!(redis.cmd(&["HGET", "warden:{s:tls-1}:s", "ver"]).as_deref(), Some("2"));
    // Trusting another CA: the server's certificate is refused; never ready, steps fail.
    let svc = service(&format!("rediss://127.0.0.1:{tls_port}"), &dir.path().join("other.crt"));
    assert_eq!(readyz_within(svc.port, 200, Duration::from_secs(2)), 503);
    let (s, _) = http(svc.port, "POST", "/v1/steps/begin", Some(begin));
    assert_eq!(s, 500);
}
