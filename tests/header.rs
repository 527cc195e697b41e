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

/// Functions of `include/dcp.h` that `include/dcp.hpp` deliberately does not call, with why.
/// Empty today: every function has a C++ counterpart (the `_free`s are the `Free` arguments of
/// `detail::Handle`). An entry here must name a function dcp.h declares and dcp.hpp does not
/// reference, so the list cannot go stale.
const NO_CPP_COUNTERPART: &[(&str, &str)] = &[];

/// The names of the functions `header` declares: `ret name(args...);` at the start of a line
/// (a return type, then the name and its parenthesis), outside comments.
fn declared_functions(header: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_comment = false;
    for line in header.lines() {
        let t = line.trim_start();
        if in_comment {
            in_comment = !t.contains("*/");
            continue;
        }
        if t.starts_with("/*") {
            in_comment = !t.contains("*/");
            continue;
        }
        if t.starts_with('#') || t.starts_with("typedef") || line.starts_with(char::is_whitespace) {
            continue;
        }
        let Some(open) = t.find('(') else { continue };
        let name = t[..open].rsplit([' ', '*']).next().unwrap_or("");
        if name.starts_with("dcp_") {
            names.push(name.to_string());
        }
    }
    names
}

/// C++ source without its comments (string and character literals are kept as they are), so
/// that a function named only in a comment does not count as covered.
fn without_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => while chars.next_if(|&n| n != '\n').is_some() {},
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = ' ';
                for n in chars.by_ref() {
                    if prev == '*' && n == '/' {
                        break;
                    }
                    prev = n;
                }
                out.push(' ');
            }
            '"' | '\'' => {
                out.push(c);
                while let Some(n) = chars.next() {
                    out.push(n);
                    if n == '\\' {
                        out.extend(chars.next());
                    } else if n == c {
                        break;
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Whether `name` occurs in `text` as a whole identifier.
fn references(text: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(name).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn cpp_header_covers_every_c_function() {
    let root = env!("CARGO_MANIFEST_DIR");
    let c = std::fs::read_to_string(format!("{root}/include/dcp.h")).unwrap();
    let cpp = without_comments(&std::fs::read_to_string(format!("{root}/include/dcp.hpp")).unwrap());
    let declared = declared_functions(&c);
    // Guards the parser itself: dcp.h declares dozens of functions, these among them.
    assert!(declared.len() > 60, "found only {} functions in dcp.h", declared.len());
    for f in [
        "dcp_last_error",
        "dcp_state_add_tensor_sharded",
        "dcp_context_new_callbacks",
        "dcp_checkpoint_free",
    ] {
        assert!(declared.iter().any(|d| d == f), "{f} not found among dcp.h's functions");
    }
    let allowed = |f: &str| NO_CPP_COUNTERPART.iter().any(|(name, _)| *name == f);
    let uncovered: Vec<&String> = declared.iter().filter(|f| !allowed(f) && !references(&cpp, f)).collect();
    assert!(
        uncovered.is_empty(),
        "include/dcp.hpp has no counterpart for these dcp.h functions (wrap them, or list them with a \
         reason in NO_CPP_COUNTERPART): {uncovered:?}"
    );
    for (name, why) in NO_CPP_COUNTERPART {
        assert!(!why.is_empty(), "{name}: give the reason it has no C++ counterpart");
        assert!(
            declared.iter().any(|d| d == name),
            "{name} is allowlisted but dcp.h does not declare it"
        );
        assert!(
            !references(&cpp, name),
            "{name} is allowlisted but dcp.hpp references it: drop it from the list"
        );
    }
}

#[test]
fn declared_functions_parses_cbindgen_output() {
    let header = "/**\n * dcp_not_a_function(x) in a comment\n */\ndcp_status dcp_a(int32_t x);\n\nconst char *dcp_b(void);\n\
                  \ndcp_status dcp_c(dcp_state *s,\n                 int32_t n);\ntypedef int32_t (*dcp_cb)(void *u);\n";
    assert_eq!(declared_functions(header), ["dcp_a", "dcp_b", "dcp_c"]);
    assert!(references("f(dcp_a); g<T, dcp_b>", "dcp_b") && !references("dcp_ab(", "dcp_a"));
    let code = without_comments("a(); // dcp_x\n/* dcp_y */ b(\"//dcp_z\", '\"'); /** dcp_w\n */ c();");
    assert_eq!(code, "a(); \n  b(\"//dcp_z\", '\"');   c();");
}
