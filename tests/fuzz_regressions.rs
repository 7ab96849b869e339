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

/// One fixture of `fixtures/fuzz/`, by the bug's name.
fn run_fixture(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/fuzz/{name}.eml"));
    run_file(&pipeline::Fixed::new(), &path);
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

/// Found by `tests/properties.rs` (fixed in decide): an agent's From that
/// is not believed (here: untrusted peer, no Authentication-Results) opened
/// a ticket with the agent's address as its requester, i.e. in the watch
/// group. The fixture's last bytes (`1`, `0`) pick that envelope.
#[test]
fn unbelieved_agent_from_became_requester() {
    let fixed = pipeline::Fixed::new();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/fuzz/unbelieved-agent-from-became-requester.eml");
    let data = std::fs::read(&path).unwrap();
    let inbound = crmgate::parse::parse(&data).unwrap();
    let (envelope, _) = pipeline::envelope_for(&data, &inbound);
    assert!(!crmgate::decide::from_is_believed(
        &fixed.config,
        &envelope,
        &inbound,
        pipeline::JANE
    ));
    let decision = crmgate::decide::decide(
        &fixed.facts(),
        &envelope,
        &inbound,
        None,
        None,
        pipeline::NOW,
    );
    let crmgate::decide::Decision::Record(plan) = decision else {
        panic!("{decision:?}")
    };
    let crmgate::decide::TicketTarget::New(new) = &plan.ticket else {
        panic!("{:?}", plan.ticket)
    };
    assert!(new.requesters.is_empty(), "{:?}", new.requesters);
    run_file(&fixed, &path);
}

/// Found by the fuzzer (2026-11-28): a To whose address reads
/// `jane.doe@example.orgö«…port@example.org` (bytes of a mangled header)
/// kept the agent's address in the public copy: the scrubber took the
/// non-ASCII letter after `.org` for more of the domain, while a reader
/// sees the agent's address followed by noise.
#[test]
fn garbled_agent_name_in_public_copy() {
    run_fixture("garbled-agent-name-in-public-copy");
}

/// Found by the fuzzer (2026-11-28): a From of
/// `jane.doe@example.org_----------=_1342…` kept the agent's address in the
/// public copy: the scrubber took `_` for more of the host name.
#[test]
fn agent_address_then_underscore_in_public_copy() {
    run_fixture("agent-address-then-underscore-in-public-copy");
}

/// Found by the fuzzer (2026-11-28), a false alarm of the checker: the
/// text held `-bob.agent@example.org` (another address, which the scrubber
/// rightly leaves), and quoted-printable broke the line right after the
/// `-`; the checker read the line start as a boundary. Soft line breaks
/// are joined before the raw bytes are searched.
#[test]
fn soft_line_break_before_an_agent_address_suffix() {
    run_fixture("soft-line-break-before-an-agent-address-suffix");
}

/// Found by the fuzzer (2026-11-28), a false alarm of the checker: a
/// receipt's Subject held `bob.agent@example.orgnnn…` (another domain, which
/// the scrubber rightly leaves), and RFC 2047 folding ended an encoded word
/// right after `.org`; the checker read the word's end as a boundary.
/// Adjacent encoded words are joined before the raw bytes are searched.
#[test]
fn encoded_word_split_after_an_agent_address_prefix() {
    run_fixture("encoded-word-split-after-an-agent-address-prefix");
}

/// Found by the fuzzer (2026-11-28): a From of `jane.do\0\0\\e…@example.org`
/// (NULs and backslashes) became a requester, and the public copy's To,
/// once quoted and read back, showed the agent's own address. Such a
/// mailbox is no mailbox: parse drops it.
#[test]
fn control_characters_in_an_address_became_the_agents() {
    run_fixture("control-characters-in-an-address-became-the-agents");
}
