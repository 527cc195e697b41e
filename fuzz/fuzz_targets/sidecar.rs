#![no_main]
//! `cargo fuzz run sidecar`: see fuzz/harness.rs.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::sidecar_decode(data));
