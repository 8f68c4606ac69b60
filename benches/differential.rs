//! The long differential run: `cargo bench --bench differential -- --cases 30000 [--seed N]`.
//! Same harness as `tests/differential.rs` (a real Redis directly vs. an identical one behind
//! stormwall; reply bytes, closes and `DEBUG DIGEST` compared), many more cases, and a report
//! of mismatch counts by category with the first example of each.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/differential.rs"]
mod differential;

use std::time::Instant;

fn main() {
    let mut cases = 30_000usize;
    let mut seed = 0xD1FF_u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cases" => cases = args.next().and_then(|v| v.parse().ok()).unwrap_or(cases),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(seed),
            // cargo bench passes --bench; anything else is a mistake worth naming.
            "--bench" => {}
            other => {
                eprintln!("unknown argument {other}; use --cases N --seed N");
                std::process::exit(2);
            }
        }
    }
    let rig = differential::Rig::start();
    let start = Instant::now();
    let tally = differential::run(&rig, seed, cases, |i| {
        if (i + 1) % 5000 == 0 {
            eprintln!("{} cases in {:.0?}", i + 1, start.elapsed());
        }
    });
    println!(
        "differential: {} cases (seed {seed:#x}) in {:.1?}: {} matched",
        tally.cases,
        start.elapsed(),
        tally.matched
    );
    println!(
        "unexplained mismatches: {} {:?}",
        tally.unexplained.values().sum::<usize>(),
        tally.unexplained
    );
    for example in &tally.examples {
        println!("  {example}");
    }
    println!(
        "known session-level mismatches: {} {:?}",
        tally.known.values().sum::<usize>(),
        tally.known
    );
    for (tag, why) in differential::KNOWN {
        println!("  {tag}: {why}");
        if let Some(example) = tally.known_examples.get(tag) {
            println!("    first: {example}");
        }
    }
    for (what, why) in differential::DELIBERATE {
        println!("deliberate difference: {what}: {why}");
    }
    if !tally.unexplained.is_empty() {
        std::process::exit(1);
    }
}
