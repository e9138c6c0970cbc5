//! The Redis store's own metrics for `/metrics`: per operation a latency histogram and an error
//! count, compare-and-swap retries, and the connection's use (commands in flight).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5];

#[derive(Debug, Clone, Copy)]
pub enum Op {
    BeginStep,
    Append,
    Session,
    Search,
    Revoke,
    Revocations,
    LogAppend,
    LogCheckpoint,
    LogRead,
    Ready,
}

const OPS: [(Op, &str); 10] = [
    (Op::BeginStep, "begin_step"),
    (Op::Append, "append"),
    (Op::Session, "session"),
    (Op::Search, "search"),
    (Op::Revoke, "revoke"),
    (Op::Revocations, "revocations"),
    (Op::LogAppend, "log_append"),
    (Op::LogCheckpoint, "log_checkpoint"),
    (Op::LogRead, "log_read"),
    (Op::Ready, "ready"),
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    errors: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    ops: [Histogram; OPS.len()],
    /// Compare-and-swap writes that found the session (or the log) changed and were recomputed.
    pub session_retries: AtomicU64,
    pub log_retries: AtomicU64,
    /// Leaves entered into the log, and how many log writes carried them (their ratio: the group size).
    pub log_leaves: AtomicU64,
    pub log_writes: AtomicU64,
    /// Store operations waiting on Redis now.
    in_flight: AtomicI64,
}

/// Counts an operation in flight until dropped.
pub struct Timer<'a> {
    m: &'a Metrics,
    op: Op,
    started: Instant,
}

impl Metrics {
    pub fn start(&self, op: Op) -> Timer<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Timer { m: self, op, started: Instant::now() }
    }

    fn hist(&self, op: Op) -> &Histogram {
        &self.ops[op as usize]
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let name = "warden_state_redis_op_seconds";
        let _ = writeln!(out, "# HELP {name} Latency of the Redis store's operations (seconds)\n# TYPE {name} histogram");
        for (op, label) in OPS {
            let h = self.hist(op);
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}_bucket{{op=\"{label}\",le=\"{le}\"}} {cumulative}");
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{op=\"{label}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{op=\"{label}\"}} {}", h.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{{op=\"{label}\"}} {count}");
        }
        let name = "warden_state_redis_op_errors_total";
        let _ = writeln!(out, "# HELP {name} Redis store operations that failed (a store error)\n# TYPE {name} counter");
        for (op, label) in OPS {
            let _ = writeln!(out, "{name}{{op=\"{label}\"}} {}", self.hist(op).errors.load(Ordering::Relaxed));
        }
        let counters = [
            ("warden_state_redis_session_retries_total", "Session writes recomputed because another write changed the session first", &self.session_retries),
            ("warden_state_redis_log_retries_total", "Log writes recomputed because another replica extended the log first", &self.log_retries),
            ("warden_state_redis_log_leaves_total", "Leaves entered into the log", &self.log_leaves),
            ("warden_state_redis_log_writes_total", "Log writes (each carries a group of leaves)", &self.log_writes),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        let name = "warden_state_redis_in_flight";
        let _ = writeln!(out, "# HELP {name} Store operations waiting on Redis now (the connection's use)\n# TYPE {name} gauge\n{name} {}", self.in_flight.load(Ordering::Relaxed));
        out
    }
}

impl Timer<'_> {
    /// Count the operation's outcome.
    pub fn done<T, E>(self, r: Result<T, E>) -> Result<T, E> {
        if r.is_err() {
            self.m.hist(self.op).errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.m.in_flight.fetch_sub(1, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let h = self.m.hist(self.op);
        if let Some(i) = BUCKETS.iter().position(|le| secs <= *le) {
            h.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_us.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }
}
