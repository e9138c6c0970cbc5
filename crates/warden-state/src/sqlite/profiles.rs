//! Each subject's behavioural profile (`warden_core::profile`) in SQL: one row per subject, its
//! profile as JSON. Read by begin-step (the snapshot the policy decides on), updated by the
//! records a batch appends, inside the caller's transaction.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};
use warden_core::profile::Profile;
use warden_core::session::SessionState;
use warden_core::wire::StepRecord;

use super::backend;
use crate::store::StoreError;

pub(super) fn load(conn: &Connection, subject: &str) -> Result<Option<Profile>, StoreError> {
    let text: Option<String> = conn
        .prepare_cached("SELECT profile FROM profiles WHERE subject = ?1")
        .map_err(backend)?
        .query_row(params![subject], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    // A profile that no longer parses is relearned rather than failing the subject's steps.
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

pub(super) fn reset(conn: &Connection, subject: &str) -> Result<bool, StoreError> {
    let n = conn.prepare_cached("DELETE FROM profiles WHERE subject = ?1").map_err(backend)?.execute(params![subject]).map_err(backend)?;
    Ok(n > 0)
}

/// The profiles a batch of records updates: each loaded once, saved once at the end.
#[derive(Default)]
pub(super) struct Learning(HashMap<String, Profile>);

impl Learning {
    pub(super) fn observe(&mut self, conn: &Connection, r: &StepRecord, session: &SessionState) -> Result<(), StoreError> {
        if !self.0.contains_key(&r.subject) {
            let p = load(conn, &r.subject)?.unwrap_or_default();
            self.0.insert(r.subject.clone(), p);
        }
        if let Some(p) = self.0.get_mut(&r.subject) {
            p.observe(r, session);
        }
        Ok(())
    }

    pub(super) fn save(self, conn: &Connection, now_ms: u64) -> Result<(), StoreError> {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO profiles (subject, profile, updated_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(subject) DO UPDATE SET profile = ?2, updated_at_ms = ?3",
            )
            .map_err(backend)?;
        for (subject, p) in self.0 {
            let text = serde_json::to_string(&p).map_err(backend)?;
            stmt.execute(params![subject, text, now_ms as i64]).map_err(backend)?;
        }
        Ok(())
    }
}
