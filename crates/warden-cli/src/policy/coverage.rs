//! Line coverage merged over many interpreter runs (regorus's `coverage` feature records it per
//! engine; every case with its own data has its own engine).

use std::collections::{BTreeMap, BTreeSet};

use warden_core::policy::dir::is_test_module;

#[derive(Default)]
pub struct Coverage {
    /// Per file: lines evaluated at least once, lines seen but never evaluated.
    files: BTreeMap<String, (BTreeSet<u32>, BTreeSet<u32>)>,
}

impl Coverage {
    pub fn add(&mut self, report: regorus::coverage::Report) {
        for file in report.files {
            if is_test_module(&file.path) {
                continue;
            }
            let entry = self.files.entry(file.path).or_default();
            entry.0.extend(file.covered);
            entry.1.extend(file.not_covered);
        }
    }

    /// A total line, then per module `file: lines 12, 15-18 not covered (…% of N lines covered)`.
    pub fn render(&self, modules: &[String]) -> String {
        let mut lines = Vec::new();
        let (mut total, mut hit, mut never) = (0usize, 0usize, 0usize);
        for path in modules {
            match self.files.get(path) {
                Some((covered, seen)) => {
                    let missed: Vec<u32> = seen.difference(covered).copied().collect();
                    let all = covered.len() + missed.len();
                    total += all;
                    hit += covered.len();
                    let pct = percent(covered.len(), all);
                    match missed.len() {
                        0 => lines.push(format!("{path}: fully covered ({pct:.1}% of {all} lines)")),
                        1 => lines.push(format!("{path}: line {} not covered ({pct:.1}% of {all} lines covered)", ranges(&missed))),
                        _ => lines.push(format!("{path}: lines {} not covered ({pct:.1}% of {all} lines covered)", ranges(&missed))),
                    }
                }
                None => {
                    never += 1;
                    lines.push(format!("{path}: never evaluated (0.0% covered)"));
                }
            }
        }
        let pct = if total == 0 && never > 0 { 0.0 } else { percent(hit, total) };
        let mut out = format!("coverage: {pct:.1}% of {total} policy lines covered (test modules excluded)");
        if never > 0 {
            // regorus only reports the lines of a module it evaluated at least once.
            out.push_str(&format!("; {never} module(s) never evaluated"));
        }
        out.push('\n');
        for l in lines {
            out.push_str("  ");
            out.push_str(&l);
            out.push('\n');
        }
        out
    }
}

fn percent(part: usize, all: usize) -> f64 {
    if all == 0 {
        100.0
    } else {
        part as f64 * 100.0 / all as f64
    }
}

/// `12, 15-18`.
pub fn ranges(lines: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let start = lines[i];
        let mut end = start;
        while i + 1 < lines.len() && lines[i + 1] == end + 1 {
            i += 1;
            end = lines[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_collapse_runs() {
        assert_eq!(ranges(&[12, 15, 16, 17, 18, 20]), "12, 15-18, 20");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn a_line_covered_anywhere_is_covered() {
        let mut c = Coverage::default();
        let file = |covered: &[u32], not: &[u32]| regorus::coverage::File {
            path: "p/a.rego".into(),
            code: String::new(),
            covered: covered.iter().copied().collect(),
            not_covered: not.iter().copied().collect(),
        };
        c.add(regorus::coverage::Report { files: vec![file(&[1], &[2, 3, 4])] });
        c.add(regorus::coverage::Report { files: vec![file(&[1, 3], &[2, 4])] });
        let out = c.render(&["p/a.rego".to_string(), "p/b.rego".to_string()]);
        assert!(out.contains("p/a.rego: lines 2, 4 not covered (50.0% of 4 lines covered)"), "{out}");
        assert!(out.contains("p/b.rego: never evaluated"), "{out}");
    }
}
