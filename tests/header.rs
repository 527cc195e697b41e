//! `include/dcp.h` must be what cbindgen generates from the current sources.
//! Regenerate it with `DCP_BLESS=1 cargo test --test header`.

#[test]
fn header_is_current() {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{root}/cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = format!("{root}/include/dcp.h");
    if std::env::var_os("DCP_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/dcp.h is stale: regenerate it with `DCP_BLESS=1 cargo test --test header` and commit it"
    );
}
