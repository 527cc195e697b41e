//! The `dcp` binary, for tests that run it. It is the `dcp-cli` workspace member's, so this
//! package's tests have no `CARGO_BIN_EXE_dcp`: `DCP_BIN` names it, else it is the `dcp` beside
//! this test binary's directory (`target/<profile>/dcp`), which `cargo test` at the workspace
//! root builds. A missing binary fails the test (it never skips).

use std::path::PathBuf;

pub fn dcp_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DCP_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> -> target/<profile>/dcp
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("dcp"))
        .expect("the test binary sits in target/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} does not exist: run the tests from the workspace root (cargo test builds dcp-cli), or set DCP_BIN",
        bin.display()
    );
    bin
}
