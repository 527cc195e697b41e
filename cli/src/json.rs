//! JSON string literals for the documents `dcp` lays out itself (`inspect --json`, the
//! safetensors index), one entry a line.

/// `s` as a JSON string literal, quotes included: serde_json's escaping, plus DEL, U+2028 and
/// U+2029 as `\u` escapes, so that neither a terminal nor a JavaScript reader takes them as
/// anything but text.
pub fn quote(s: &str) -> String {
    let q = serde_json::to_string(s).expect("a string serializes");
    if !q.contains(['\u{7f}', '\u{2028}', '\u{2029}']) {
        return q;
    }
    let mut out = String::with_capacity(q.len() + 10);
    for c in q.chars() {
        match c {
            '\u{7f}' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quotes_parse_back() {
        for s in ["", "plain", "q\"b\\s/", "nl\n\t\r\u{1}\u{7f}", "ünï😀", "\u{2028}"] {
            let q = quote(s);
            assert!(!q.contains(['\n', '\u{1}', '\u{7f}', '\u{2028}']), "{q}");
            assert_eq!(serde_json::from_str::<String>(&q).unwrap(), s);
        }
        assert_eq!(quote("a\"\n\u{1}\u{7f}"), r#""a\"\n\u0001\u007f""#);
    }
}
