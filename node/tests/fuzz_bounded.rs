//! Each fuzz target (`raftkv::fuzzing`) for a bounded time over random and mutated inputs: a
//! panic on any of them fails the suite. `fuzz/` runs the same targets under libFuzzer for
//! longer, coverage-guided campaigns.

use std::time::{Duration, Instant};

/// Seconds per target; `RAFTKV_FUZZ_SECONDS` lengthens a run.
fn budget() -> Duration {
    Duration::from_secs(
        std::env::var("RAFTKV_FUZZ_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(4),
    )
}

fn mutate(input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    match rand::random_range(0..7u8) {
        0 if !input.is_empty() => {
            let at = rand::random_range(0..input.len());
            input[at] ^= 1 << rand::random_range(0..8u8);
        }
        1 if !input.is_empty() => {
            let at = rand::random_range(0..input.len());
            input[at] = *[0u8, 1, 0x7f, 0x80, 0xff, b'.', b'{', b'"']
                .get(rand::random_range(0..8usize))
                .unwrap_or(&0);
        }
        2 => {
            let at = rand::random_range(0..=input.len());
            let n = rand::random_range(1..16usize);
            let bytes: Vec<u8> = (0..n).map(|_| rand::random()).collect();
            input.splice(at..at, bytes);
        }
        3 if !input.is_empty() => {
            let at = rand::random_range(0..input.len());
            input.truncate(at);
        }
        4 if !input.is_empty() => {
            // Repeat a slice: nesting and length prefixes grow.
            let a = rand::random_range(0..input.len());
            let b = rand::random_range(a..=input.len().min(a + 32));
            let chunk = input[a..b].to_vec();
            for _ in 0..rand::random_range(1..64usize) {
                input.splice(a..a, chunk.iter().copied());
            }
        }
        5 if !seeds.is_empty() => {
            // Splice with another seed.
            let other = &seeds[rand::random_range(0..seeds.len())];
            let at = rand::random_range(0..=input.len());
            let from = rand::random_range(0..=other.len());
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            let n = rand::random_range(0..64usize);
            *input = (0..n).map(|_| rand::random()).collect();
        }
    }
    input.truncate(1 << 16);
}

#[test]
fn every_fuzz_target_survives_random_and_mutated_input() {
    for (name, target) in raftkv::fuzzing::TARGETS {
        let seeds = raftkv::fuzzing::seeds(name);
        assert!(!seeds.is_empty(), "{name} has seeds");
        for s in &seeds {
            target(s);
        }
        let deadline = Instant::now() + budget();
        let mut runs = 0u64;
        let mut input = Vec::new();
        while Instant::now() < deadline {
            if runs.is_multiple_of(64) {
                input = seeds[rand::random_range(0..seeds.len())].clone();
            }
            for _ in 0..rand::random_range(1..4u8) {
                mutate(&mut input, &seeds);
            }
            target(&input);
            runs += 1;
        }
        println!("{name}: {runs} inputs");
        assert!(runs > 100, "{name} ran");
    }
}
