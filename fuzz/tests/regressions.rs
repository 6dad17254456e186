//! Replays every saved fuzz finding (`regressions/<target>/<file>`) and the
//! seeds (`seeds/<target>/`) through their harnesses, then a few hundred
//! pseudo-random inputs per target: the harnesses stay compiling and
//! running, and a finding that once crashed a decoder must not again.

use std::path::Path;

/// Pseudo-random inputs per target (a fixed seed: the same every run).
const RANDOM_INPUTS: usize = 200;
const RANDOM_BYTES_MAX: usize = 600;

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths
}

#[test]
fn saved_findings_and_seeds_run_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for (name, run) in runnel_fuzz::TARGETS {
        for dir in [root.join("regressions").join(name), root.join("seeds").join(name)] {
            for path in files(&dir) {
                let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                eprintln!("replaying {}", path.display());
                run(&data);
                replayed += 1;
            }
        }
    }
    assert!(replayed > 0, "no finding or seed found under {}", root.display());
}

#[test]
fn every_target_runs_on_pseudo_random_inputs() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (_, run) in runnel_fuzz::TARGETS {
        for _ in 0..RANDOM_INPUTS {
            let len = next() as usize % RANDOM_BYTES_MAX;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            run(&data);
        }
    }
}
