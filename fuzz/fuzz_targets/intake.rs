//! Fuzz target `intake`: the daemon's intake without its database.
//!
//! Any input goes through `parse::parse` → `decide::decide` → `compose::compose`
//! (see `../pipeline.rs`). A panic that escapes is a message that would take
//! an SMTP session or the writer thread down; a broken invariant (an agent's
//! address in mail to a requester, a work note to a non-agent, a CRM address
//! as recipient, a double delivery) is turned into a panic so libFuzzer keeps
//! the input.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../pipeline.rs"]
mod pipeline;

static FIXED: OnceLock<pipeline::Fixed> = OnceLock::new();

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even one that `parse` catches
        // on purpose around mail-parser (its catch_unwind is part of the
        // daemon's design). Keep the message but let catch_unwind work: a
        // panic that escapes still aborts in libfuzzer-sys' own wrapper.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic (caught or not): {info}");
        }));
        FIXED.get_or_init(pipeline::Fixed::new);
    },
    |data: &[u8]| {
        let fixed = FIXED.get_or_init(pipeline::Fixed::new);
        if let Err(violation) = pipeline::run(fixed, data) {
            panic!("invariant broken: {violation}");
        }
    }
);
