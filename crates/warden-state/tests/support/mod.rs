//! Real Redis servers for the store tests: `redis-server` (Debian's package, installed by `make
//! setup`) on a free loopback port, its files in a temporary directory, ready once it answers
//! PING, killed when dropped (also when the test fails). Without redis-server the Redis tests
//! fail, naming `make setup`: they never skip silently.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_server() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("redis-server"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("redis-server is not installed: run `make setup` (it installs Debian's redis-server and redis-tools)"))
}

impl RedisServer {
    /// No persistence: the tests' data lives as long as the server.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// With AOF, fsync on every write: what an acknowledged write survives a restart with.
    pub fn start_durable() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "yes", "--appendfsync", "always"])
    }

    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Self { child: None, port: 0, dir, args: args.iter().map(|a| a.to_string()).collect() };
        // A port picked free may be taken before redis-server binds it: try another.
        for _ in 0..5 {
            s.port = free_port();
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server did not start on a free port in 5 tries");
    }

    fn spawn(&mut self) -> bool {
        let log = self.dir.path().join("redis.log");
        let child = Command::new(redis_server())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(self.dir.path())
            .args(["--logfile"])
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): run `make setup`"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!("redis-server exited with {status}: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server on port {} did not answer PING within 10 s", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> bool {
        self.cmd(&["PING"]).is_some_and(|r| r == "PONG")
    }

    /// One command over RESP, its reply as text (None when the server does not answer).
    pub fn cmd(&self, args: &[&str]) -> Option<String> {
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        let mut r = BufReader::new(s);
        r.read_line(&mut line).ok()?;
        let line = line.trim_end();
        match line.as_bytes().first()? {
            b'+' | b'-' | b':' => Some(line[1..].to_string()),
            b'$' => {
                let n: i64 = line[1..].parse().ok()?;
                if n < 0 {
                    return Some(String::new());
                }
                let mut buf = vec![0; n as usize + 2];
                std::io::Read::read_exact(&mut r, &mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..n as usize]).into())
            }
            _ => Some(line.to_string()),
        }
    }

    /// Kill it (SIGKILL: a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and directory (what it kept on disk comes back).
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server could not take its port {} again", self.port);
    }
}

/// A local Redis Cluster: three masters, no replicas, each slot range on its own server.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                // The cluster bus gets its own free port (by default it is the port + 10000).
                let bus = free_port().to_string();
                let args = ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000", "--cluster-port", &bus];
                RedisServer::start_with(&args)
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): run `make setup` (it installs redis-tools)"));
        assert!(out.status.success(), "redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|n| n.cmd(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok"))) {
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { nodes }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
