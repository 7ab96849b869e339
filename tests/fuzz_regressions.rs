//! What the fuzzer found, kept found: every input under `fixtures/fuzz/`
//! (and every seed of `fixtures/corpus/`) goes through the same pipeline as
//! the fuzz target `intake` (`fuzz/pipeline.rs`: parse → decide → compose,
//! invariants checked). A crash the fuzzer reports gets its input copied to
//! `fixtures/fuzz/<bug-name>.eml` and a test named after the bug below.

#[path = "../fuzz/pipeline.rs"]
mod pipeline;

use std::path::Path;

fn run_file(fixed: &pipeline::Fixed, path: &Path) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Err(v) = pipeline::run(fixed, &data) {
        panic!("{}: {v}", path.display());
    }
}

fn run_dir(dir: &str) -> usize {
    let fixed = pipeline::Fixed::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut paths: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    paths.sort();
    for p in &paths {
        run_file(&fixed, p);
    }
    paths.len()
}

#[test]
fn every_seed_of_the_corpus_keeps_the_invariants() {
    assert!(run_dir("fixtures/corpus") > 50);
}

#[test]
fn every_input_the_fuzzer_found_keeps_the_invariants() {
    run_dir("fixtures/fuzz");
}

#[test]
fn the_checker_sees_a_whole_address_and_only_a_whole_one() {
    use pipeline::contains_whole;
    assert!(contains_whole(
        "de : jane.doe@example.org a écrit",
        "jane.doe@example.org"
    ));
    assert!(contains_whole(
        "<jane.doe@example.org>",
        "jane.doe@example.org"
    ));
    assert!(contains_whole(
        "jane.doe@example.org.",
        "jane.doe@example.org"
    ));
    assert!(!contains_whole(
        "xjane.doe@example.org",
        "jane.doe@example.org"
    ));
    assert!(!contains_whole(
        "jane.doe@example.org.uk",
        "jane.doe@example.org"
    ));
    assert!(!contains_whole(
        "jane.doe@example.orgs",
        "jane.doe@example.org"
    ));
}
