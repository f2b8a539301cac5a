//! Fuzz login: text parsing and the login state machine (negotiation and
//! CHAP) over arbitrary sequences of Login Request PDUs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ironblock_target::login::text::parse(data);
    ironblock_target::login::negotiate::fuzz_login(data);
});
