//! A subject's behavioural profile: what it habitually does across all its sessions (regions,
//! devices, workloads, tools, authorities, hours of day, step rate, response volume), so a
//! policy can tell "unusual for this identity" from "changed within this session". The state
//! service keeps one per subject, updated from the records it admits (`observe`, the one rule
//! every store calls), and hands it out with each begin-step snapshot (`SessionState::profile`),
//! so cached mode needs no extra call.
//!
//! Bounded and forgetful: at most `MAX_HABITS` values of each kind (the least used goes first),
//! every count halved every `HALF_LIFE_MS`, so old habits fade. No secrets and no payloads: the
//! values are the ones a record already holds (fingerprints are not kept at all).

use std::collections::BTreeMap;

use regorus::Value;
use serde::{Deserialize, Serialize};

use crate::session::SessionState;
use crate::value::Obj;
use crate::wire::StepRecord;

/// Distinct values kept per kind.
pub const MAX_HABITS: usize = 32;
/// Counts halve every 14 days.
pub const HALF_LIFE_MS: u64 = 14 * 24 * 60 * 60 * 1000;
/// The weight of a new step in the step-rate and response-volume averages.
const AVERAGE_WEIGHT: f64 = 0.05;

/// How often (decayed) and when a value was seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Habit {
    pub count: f64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Profile {
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Steps seen, decayed.
    pub steps: f64,
    pub regions: BTreeMap<String, Habit>,
    pub devices: BTreeMap<String, Habit>,
    pub workloads: BTreeMap<String, Habit>,
    pub tools: BTreeMap<String, Habit>,
    /// The hosts (`:authority`) called: tenants, for multi-tenant APIs.
    pub authorities: BTreeMap<String, Habit>,
    /// Steps per UTC hour of day (24 counts), decayed.
    pub hours: Vec<f64>,
    /// Typical steps per minute within a session (a moving average).
    pub step_rate: f64,
    /// Typical response bytes per step (a moving average).
    pub bytes_per_step: f64,
}

fn halve(count: &mut f64, factor: f64) {
    *count *= factor;
}

fn see(map: &mut BTreeMap<String, Habit>, value: Option<&str>, at_ms: u64) {
    let Some(v) = value.filter(|v| !v.is_empty()) else { return };
    if !map.contains_key(v) && map.len() >= MAX_HABITS {
        // The least used habit makes room (the longest unseen among equals).
        let weakest = map
            .iter()
            .min_by(|a, b| a.1.count.total_cmp(&b.1.count).then(a.1.last_seen_ms.cmp(&b.1.last_seen_ms)))
            .map(|(k, _)| k.clone());
        if let Some(k) = weakest {
            map.remove(&k);
        }
    }
    let h = map.entry(v.to_string()).or_insert(Habit { count: 0.0, first_seen_ms: at_ms, last_seen_ms: at_ms });
    h.count += 1.0;
    h.first_seen_ms = h.first_seen_ms.min(at_ms);
    h.last_seen_ms = h.last_seen_ms.max(at_ms);
}

fn average(avg: &mut f64, sample: f64, first: bool) {
    *avg = if first { sample } else { *avg + AVERAGE_WEIGHT * (sample - *avg) };
}

impl Profile {
    /// Learn from one admitted record of `session` (its state after the record): fade what
    /// was seen before by the time passed, then count what this step saw.
    pub fn observe(&mut self, r: &StepRecord, session: &SessionState) {
        let first = self.steps == 0.0 && self.first_seen_ms == 0;
        if first {
            self.first_seen_ms = r.at_ms;
        }
        if r.at_ms > self.last_seen_ms && !first {
            let factor = 0.5f64.powf((r.at_ms - self.last_seen_ms) as f64 / HALF_LIFE_MS as f64);
            halve(&mut self.steps, factor);
            for map in [&mut self.regions, &mut self.devices, &mut self.workloads, &mut self.tools, &mut self.authorities] {
                for h in map.values_mut() {
                    halve(&mut h.count, factor);
                }
            }
            for c in &mut self.hours {
                halve(c, factor);
            }
        }
        self.first_seen_ms = self.first_seen_ms.min(r.at_ms);
        self.last_seen_ms = self.last_seen_ms.max(r.at_ms);
        self.steps += 1.0;
        see(&mut self.regions, r.region.as_deref(), r.at_ms);
        see(&mut self.devices, r.device.as_deref(), r.at_ms);
        see(&mut self.workloads, r.workload.as_deref(), r.at_ms);
        see(&mut self.authorities, r.authority.as_deref(), r.at_ms);
        see(&mut self.tools, r.tool.as_deref(), r.at_ms);
        self.hours.resize(24, 0.0);
        let hour = ((r.at_ms / 3_600_000) % 24) as usize;
        self.hours[hour] += 1.0;
        let minutes = (r.at_ms.saturating_sub(session.started_at_ms) as f64 / 60_000.0).max(1.0);
        average(&mut self.step_rate, r.step as f64 / minutes, first);
        if let Some(bytes) = r.response_bytes {
            average(&mut self.bytes_per_step, bytes as f64, first);
        }
    }

    /// The profile as the policy sees it (`input.identity.profile`): times in seconds, each
    /// kind a map from value to its (decayed) count, so a policy looks a value up directly.
    pub fn to_value(&self) -> Value {
        let counts = |map: &BTreeMap<String, Habit>| {
            let mut o = Obj::new();
            for (k, h) in map {
                o = o.set(k, Value::from(h.count));
            }
            o.build()
        };
        let hours: Vec<Value> = (0..24).map(|h| Value::from(self.hours.get(h).copied().unwrap_or(0.0))).collect();
        Obj::new()
            .set("first_seen", Value::from(self.first_seen_ms / 1000))
            .set("last_seen", Value::from(self.last_seen_ms / 1000))
            .set("steps", Value::from(self.steps))
            .set("regions", counts(&self.regions))
            .set("devices", counts(&self.devices))
            .set("workloads", counts(&self.workloads))
            .set("tools", counts(&self.tools))
            .set("authorities", counts(&self.authorities))
            .set("hours", Value::from(hours))
            .set("step_rate", Value::from(self.step_rate))
            .set("bytes_per_step", Value::from(self.bytes_per_step))
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 24 * 60 * 60 * 1000;

    fn rec(at_ms: u64, region: &str) -> StepRecord {
        StepRecord { step: 1, at_ms, region: Some(region.into()), authority: Some("t1.example".into()), tool: Some("search".into()), response_bytes: Some(1000), ..Default::default() }
    }

    #[test]
    fn habits_are_counted_bounded_and_fade() {
        let s = SessionState::default();
        let mut p = Profile::default();
        for i in 0..10 {
            p.observe(&rec(100 * DAY + i, "eu"), &s);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        for c in [p.steps, p.regions["eu"].count, p.tools["search"].count, p.authorities["t1.example"].count, p.hours.iter().sum::<f64>()] {
            assert!(close(c, 10.0), "{c}");
        }
        assert_eq!((p.first_seen_ms, p.bytes_per_step), (100 * DAY, 1000.0));
        // Four weeks later: two half-lives, the old habit weighs a quarter.
        p.observe(&rec(128 * DAY + 9, "ap"), &s);
        assert!(close(p.regions["eu"].count, 2.5), "{}", p.regions["eu"].count);
        assert_eq!(p.regions["ap"].count, 1.0);
        // Bounded: the least used values make room.
        for i in 0..100 {
            p.observe(&rec(128 * DAY + 10 + i, &format!("r{i}")), &s);
        }
        assert_eq!(p.regions.len(), MAX_HABITS);
        assert!(p.regions.contains_key("eu"), "the strongest habit stays");
        // A late record (older than the last) is counted without fading anything.
        let before = p.regions["eu"].count;
        p.observe(&rec(50 * DAY, "eu"), &s);
        assert_eq!(p.regions["eu"].count, before + 1.0);
        assert_eq!(p.first_seen_ms, 50 * DAY);
    }
}
