#![no_main]
//! `cargo fuzz run zipitem`: see fuzz/harness.rs.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::zip_item(data));
