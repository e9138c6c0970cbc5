//! Session Warden's session-state service: each session's state, revocations, and its
//! hash-chained attribution trail, behind a versioned JSON API.

pub mod api;
pub mod migrate;
pub mod redis;
pub mod sqlite;
pub mod ssf;
pub mod store;
pub mod validate;

pub use api::{app, AppState};
