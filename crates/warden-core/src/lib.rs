//! Session Warden's host-agnostic core. The proxy-wasm crate hands it the request headers and a
//! `Host`; it answers with a `RequestOutcome` that says which headers to strip and stamp, or
//! which local reply to send. Nothing here imports proxy_wasm, so all of it is tested natively.
//!
//! The request flow is `flow` (the `Warden`); the domain rules it and every store share live
//! in `session` (binding, what a step or record adds), `admission` (what a store accepts of a
//! record), `trail` (the hash chain) and `wire` (what proxies and the state service exchange).
//! docs/ARCHITECTURE.md maps the rest.

pub mod callouts;
pub mod admission;
pub mod canonical;
pub mod config;
pub mod correlation;
pub mod decision;
pub mod error;
pub mod flow;
pub mod hash;
pub mod host;
pub mod identity;
pub mod input;
pub mod mcp;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod profile;
pub mod session;
pub mod ssf;
pub mod trail;
pub mod value;
pub mod wire;

pub use flow::{Body, Early, Held, JwksTarget, LocalReply, Pending, RequestOutcome, StateCall, StateFailure, Step, Warden};

#[cfg(test)]
mod tests;
