//! `warden profile show|reset <subject>`: what a subject habitually does across its sessions
//! (the profile the library's `*_unusual`, `tenant_spread` and `data_volume` signals compare a
//! step with), and forgetting it after an intended change of habits.

use std::process::ExitCode;

use clap::Subcommand;
use warden_core::profile::{Habit, Profile};

use crate::client::{self, Client};
use crate::time;

#[derive(Subcommand)]
pub enum ProfileCommand {
    /// The subject's profile: each kind's values by how often (decayed) and when they were seen.
    Show { subject: String },
    /// Forget the profile: it is learned again from the subject's next steps (its learning
    /// period starts again, so the `*_unusual` signals stay quiet meanwhile).
    Reset { subject: String },
}

pub fn run(command: ProfileCommand, client: &Client, json: bool) -> Result<ExitCode, String> {
    match command {
        ProfileCommand::Show { subject } => {
            let p: Profile = client.get(&format!("/v1/profiles/{}", client::escape(&subject)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p).map_err(|e| e.to_string())?);
            } else {
                print(&subject, &p);
            }
            Ok(ExitCode::SUCCESS)
        }
        ProfileCommand::Reset { subject } => {
            let v: serde_json::Value = client.delete(&format!("/v1/profiles/{}", client::escape(&subject)))?;
            if json {
                println!("{v}");
            } else if v["reset"].as_bool() == Some(true) {
                println!("profile of {subject} reset: it is learned again from its next steps");
            } else {
                println!("{subject} had no profile");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print(subject: &str, p: &Profile) {
    println!("subject   {subject}");
    println!("seen      {} .. {}    steps {:.1} (decayed)", time::format_ms(p.first_seen_ms), time::format_ms(p.last_seen_ms), p.steps);
    println!("typical   {:.1} steps/min in a session, {:.0} response bytes/step", p.step_rate, p.bytes_per_step);
    for (kind, map) in [("regions", &p.regions), ("devices", &p.devices), ("workloads", &p.workloads), ("tools", &p.tools), ("authorities", &p.authorities)] {
        if map.is_empty() {
            continue;
        }
        let mut habits: Vec<(&String, &Habit)> = map.iter().collect();
        habits.sort_by(|a, b| b.1.count.total_cmp(&a.1.count));
        println!("{kind}");
        for (v, h) in habits {
            println!("  {:>8.1}  {v}  (last {})", h.count, time::format_ms(h.last_seen_ms));
        }
    }
    let total: f64 = p.hours.iter().sum();
    if total > 0.0 {
        let hours: Vec<String> = p.hours.iter().enumerate().filter(|(_, c)| **c / total >= 0.01).map(|(h, c)| format!("{h:02}h {:.0}%", c / total * 100.0)).collect();
        println!("hours     {} (UTC)", hours.join("  "));
    }
}
