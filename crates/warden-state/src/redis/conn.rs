//! The connection: one server (`redis://`, `rediss://`: a multiplexed connection that
//! reconnects by itself) or a Redis Cluster (`redis+cluster://h1:p1,h2:p2`,
//! `rediss+cluster://…`: slots discovered from the nodes given, requests routed by key).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

use crate::store::StoreError;

/// How long one command may take before it fails (a Redis that is gone must not hang requests:
/// the proxies' own deadline is shorter still).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, pipeline: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Commands sent in one round trip, grouped by hash slot: on one server every group goes
    /// in one pipeline (one write, one read; Redis runs them in order, not atomically); on a
    /// Cluster each group is a pipeline of its own, to its slot's node, all sent at once (a
    /// pipeline there must stay in one slot). Each command's reply, in order; a command that
    /// failed is an `Err` in its place (the others still ran).
    pub fn pipelines(&self, groups: Vec<Vec<Cmd>>) -> Vec<Pipeline> {
        let mut out: Vec<Pipeline> = Vec::new();
        for g in groups.into_iter().filter(|g| !g.is_empty()) {
            if out.is_empty() || matches!(self, Self::Cluster(_)) {
                let mut p = redis::pipe();
                p.ignore_errors();
                out.push(p);
            }
            if let Some(p) = out.last_mut() {
                for c in g {
                    p.add_command(c);
                }
            }
        }
        out
    }

    /// Send `pipelines` (from `pipelines`) at once; every reply, in order.
    pub async fn round_trip(&self, pipelines: &[Pipeline]) -> Result<Vec<RedisResult<Value>>, StoreError> {
        let sends = pipelines.iter().map(|p| {
            let mut c = self.clone();
            async move { p.query_async::<Vec<RedisResult<Value>>>(&mut c).await.map_err(backend) }
        });
        Ok(futures_util::future::try_join_all(sends).await?.into_iter().flatten().collect())
    }
}

/// Whether a store URL names Redis (else it is SQLite's).
pub fn is_redis_url(url: &str) -> bool {
    ["redis://", "rediss://", "redis+cluster://", "rediss+cluster://"].iter().any(|p| url.starts_with(p))
}

/// A cluster URL's seed nodes as single-node URLs: `redis+cluster://[user:pass@]h1:p1,h2:p2[/db]`
/// → `redis://[user:pass@]h1:p1`, `redis://[user:pass@]h2:p2`.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+cluster://") {
        ("redis", r)
    } else {
        ("rediss", url.strip_prefix("rediss+cluster://")?)
    };
    let rest = rest.split(['/', '?']).next().unwrap_or("");
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("{scheme}://{auth}{h}")).collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("redis: {e}"))
}

/// Connect. A single server's connection is made lazily and re-made whenever it breaks, so the
/// service starts (and answers 503 on `/readyz`) while Redis is away; a cluster's first
/// connection needs a seed node to answer.
pub async fn connect(url: &str) -> Result<Conn, StoreError> {
    // rustls needs its crypto provider chosen once per process (for `rediss://`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(nodes) = cluster_nodes(url) {
        let client = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(2)
            .build()
            .map_err(backend)?;
        let conn = client.get_async_connection().await.map_err(backend)?;
        return Ok(Conn::Cluster(conn));
    }
    let client = redis::Client::open(url).map_err(backend)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?;
    Ok(Conn::Single(manager))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cluster_urls_name_their_seed_nodes() {
        assert_eq!(cluster_nodes("redis+cluster://a:1,b:2").unwrap(), vec!["redis://a:1", "redis://b:2"]);
        assert_eq!(cluster_nodes("rediss+cluster://u:p@a:1,b:2/0").unwrap(), vec!["rediss://u:p@a:1", "rediss://u:p@b:2"]);
        assert_eq!(cluster_nodes("redis://a:1"), None);
        assert_eq!(cluster_nodes("redis+cluster://"), None);
        assert!(is_redis_url("rediss://h:6380") && !is_redis_url("sqlite:/x.db"));
        assert_eq!(redacted("redis://:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
