#![no_main]
//! `cargo fuzz run pickle`: see fuzz/harness.rs.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::pickle_parse(data));
