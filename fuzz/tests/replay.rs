//! Replays every fuzz target over its committed corpus (`corpus/<target>/`) and the inputs that
//! once crashed it (`regressions/<target>/`), on stable Rust and without libFuzzer: `make test`
//! runs it, so a seed or a fixed crash that panics again fails the build.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
    out.sort();
    out
}

#[test]
fn every_target_replays_its_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failures = Vec::new();
    for (name, run) in warden_fuzz::TARGETS {
        let corpus = files(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ has no seeds");
        let regressions = files(&root.join("regressions").join(name));
        for path in corpus.iter().chain(regressions.iter()) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let why = e.downcast_ref::<String>().map(String::as_str).or_else(|| e.downcast_ref::<&str>().copied()).unwrap_or("?");
                failures.push(format!("{}: {why}", path.strip_prefix(root).unwrap_or(path).display()));
            }
        }
        eprintln!("[replay] {name}: {} seeds, {} regressions", corpus.len(), regressions.len());
    }
    assert!(failures.is_empty(), "inputs that panic (reproduce with `cargo fuzz run <target> <file>`):\n{}", failures.join("\n"));
}

#[test]
fn every_target_has_a_libfuzzer_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, _) in warden_fuzz::TARGETS {
        assert!(root.join("fuzz_targets").join(format!("{name}.rs")).is_file(), "fuzz_targets/{name}.rs is missing");
    }
}
