//! Plain Python values (None, bool, int, float, str, bytes, list, tuple, dict): to and from
//! pickles, to and from Python literal text. These are the non-tensor entries of a state dict
//! (`optimizer.param_groups.0.lr`, `betas`, an opaque blob), stored by torch DCP as `torch.save`
//! items.

use super::pickle::{self, Budget, Graph, Node, NodeId, PickleWriter};
use crate::error::{Error, Result};
use std::fmt;

/// A plain Python value, as a pickle or a Python literal (`(0.9, 0.999)`) gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    /// `None`.
    None,
    /// `True` or `False`.
    Bool(bool),
    /// An `int` that fits in 64 bits.
    Int(i64),
    /// A `float`.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A `bytes` object.
    Bytes(Vec<u8>),
    /// A `list`.
    List(Vec<PyValue>),
    /// A `tuple`.
    Tuple(Vec<PyValue>),
    /// A `dict`, its pairs in insertion order.
    Dict(Vec<(PyValue, PyValue)>),
}

const MAX_DEPTH: usize = 256;

/// What one value costs where it sits (in a list, a tuple, a dict pair), for [`Budget`] charges.
const VALUE_SLOT: u64 = std::mem::size_of::<PyValue>() as u64;

impl PyValue {
    /// Writes the value's opcodes (no PROTO/STOP).
    pub fn write(&self, w: &mut PickleWriter) {
        match self {
            PyValue::None => {
                w.none();
            }
            PyValue::Bool(b) => {
                w.bool(*b);
            }
            PyValue::Int(v) => {
                w.int(*v);
            }
            PyValue::Float(v) => {
                w.float(*v);
            }
            PyValue::Str(s) => {
                w.str(s);
            }
            PyValue::Bytes(b) => {
                w.bytes(b);
            }
            PyValue::List(items) => {
                w.empty_list();
                if !items.is_empty() {
                    w.mark();
                    for it in items {
                        it.write(w);
                    }
                    w.appends();
                }
            }
            PyValue::Tuple(items) => {
                if items.len() > 3 {
                    w.mark();
                }
                for it in items {
                    it.write(w);
                }
                w.tuple(items.len());
            }
            PyValue::Dict(items) => {
                w.empty_dict();
                if !items.is_empty() {
                    w.mark();
                    for (k, v) in items {
                        k.write(w);
                        v.write(w);
                    }
                    w.setitems();
                }
            }
        }
    }

    /// A complete pickle of the value, in the protocol `torch.save` uses (2).
    pub fn to_pickle(&self) -> Vec<u8> {
        let mut w = PickleWriter::new(2);
        self.write(&mut w);
        w.finish()
    }

    /// Interprets a pickle as a plain value; `Ok(None)` when it holds anything else (a class
    /// instance, a tensor reference), which callers then keep as an opaque pickle. A pickle whose
    /// value would expand past [`PyValue::budget`] (shared references, each a copy here) is an
    /// error.
    pub fn from_pickle(data: &[u8], what: &str) -> Result<Option<PyValue>> {
        let g = pickle::parse(data, what)?;
        Self::from_graph(&g, g.root, &Self::budget(data.len(), what))
    }

    /// What the value of a pickle of `input` bytes may cost, in bytes materialised: 64 per
    /// input byte plus 1 MiB. Without shared references no value costs more than 32 per byte
    /// (a one-byte `None` or `()` opcode becomes a 32-byte value; a str, its own length).
    pub fn budget(input: usize, what: &str) -> Budget {
        Budget::new(what, input, 64, 1 << 20)
    }

    /// The plain value of node `id`, charging `budget` for what it materialises: the slots of
    /// every list, tuple and dict (before they are allocated) and the bytes of every str and
    /// bytes, once per reference. The root's own slot is charged too, so every node visited is
    /// paid for and the time taken is bounded by the budget as well.
    pub fn from_graph(g: &Graph, id: NodeId, budget: &Budget) -> Result<Option<PyValue>> {
        budget.charge(VALUE_SLOT)?;
        Self::from_node(g, id, 0, budget)
    }

    fn from_node(g: &Graph, id: NodeId, depth: usize, budget: &Budget) -> Result<Option<PyValue>> {
        if depth > MAX_DEPTH {
            return Ok(None);
        }
        let seq = |items: &[NodeId]| -> Result<Option<Vec<PyValue>>> {
            budget.charge_items(items.len(), VALUE_SLOT as usize)?;
            let mut out = Vec::with_capacity(items.len());
            for &i in items {
                match Self::from_node(g, i, depth + 1, budget)? {
                    Some(v) => out.push(v),
                    None => return Ok(None),
                }
            }
            Ok(Some(out))
        };
        Ok(Some(match g.node(id) {
            Node::None => PyValue::None,
            Node::Bool(b) => PyValue::Bool(*b),
            Node::Int(v) => PyValue::Int(*v),
            Node::Float(v) => PyValue::Float(*v),
            Node::Str(s) => {
                budget.charge(s.len() as u64)?;
                PyValue::Str(s.clone())
            }
            Node::Bytes(b) => {
                budget.charge(b.len() as u64)?;
                PyValue::Bytes(b.clone())
            }
            Node::Tuple(items) => match seq(items)? {
                Some(v) => PyValue::Tuple(v),
                None => return Ok(None),
            },
            Node::List(items) => match seq(items)? {
                Some(v) => PyValue::List(v),
                None => return Ok(None),
            },
            Node::Dict(items) => {
                budget.charge_items(items.len(), 2 * VALUE_SLOT as usize)?;
                let mut out = Vec::with_capacity(items.len());
                for &(k, v) in items {
                    let k = Self::from_node(g, k, depth + 1, budget)?;
                    let v = Self::from_node(g, v, depth + 1, budget)?;
                    match (k, v) {
                        (Some(k), Some(v)) => out.push((k, v)),
                        _ => return Ok(None),
                    }
                }
                PyValue::Dict(out)
            }
            Node::Call { .. } => {
                let Some(((module, name), args, state)) = g.as_call(id) else {
                    return Ok(None);
                };
                let Some(args) = g.as_seq(args) else {
                    return Ok(None);
                };
                if state.is_some() {
                    return Ok(None);
                }
                match (module, name, args.len()) {
                    ("_codecs", "encode", 2) => {
                        let (Some(text), Some("latin1")) = (g.as_str(args[0]), g.as_str(args[1])) else {
                            return Ok(None);
                        };
                        budget.charge(text.len() as u64)?;
                        let bytes: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(c as u32).ok()).collect();
                        match bytes {
                            Some(b) => PyValue::Bytes(b),
                            None => return Ok(None),
                        }
                    }
                    ("__builtin__" | "builtins", "bytes", 0) => PyValue::Bytes(vec![]),
                    ("__builtin__" | "builtins", "bytearray", 1) => match g.node(args[0]) {
                        Node::Bytes(b) => {
                            budget.charge(b.len() as u64)?;
                            PyValue::Bytes(b.clone())
                        }
                        _ => return Ok(None),
                    },
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        }))
    }

    /// Parses Python literal syntax: `None`, `True`, `3`, `-1.5e3`, `inf`, `'text'`, `b'\x00'`,
    /// `[..]`, `(..)`, `{k: v}`.
    pub fn parse_literal(text: &str) -> Result<PyValue> {
        let mut p = LiteralParser {
            s: text.as_bytes(),
            pos: 0,
            text,
        };
        let v = p.value(0)?;
        p.ws();
        if p.pos != p.s.len() {
            return Err(p.err("unexpected text after the value"));
        }
        Ok(v)
    }
}

impl fmt::Display for PyValue {
    /// Python `repr` syntax, which [`PyValue::parse_literal`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyValue::None => f.write_str("None"),
            PyValue::Bool(true) => f.write_str("True"),
            PyValue::Bool(false) => f.write_str("False"),
            PyValue::Int(v) => write!(f, "{v}"),
            PyValue::Float(v) => {
                if v.is_nan() {
                    f.write_str("nan")
                } else if v.is_infinite() {
                    f.write_str(if *v > 0.0 { "inf" } else { "-inf" })
                } else if v.fract() == 0.0 && v.abs() < 1e16 {
                    write!(f, "{v:.1}")
                } else {
                    write!(f, "{v:?}")
                }
            }
            PyValue::Str(s) => {
                f.write_str("'")?;
                for c in s.chars() {
                    match c {
                        '\'' => f.write_str("\\'")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        c if (c as u32) < 0x20 => write!(f, "\\x{:02x}", c as u32)?,
                        c => write!(f, "{c}")?,
                    }
                }
                f.write_str("'")
            }
            PyValue::Bytes(b) => BytesLiteral(b).fmt(f),
            PyValue::List(items) => {
                f.write_str("[")?;
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{it}")?;
                }
                f.write_str("]")
            }
            PyValue::Tuple(items) => {
                f.write_str("(")?;
                for (i, it) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{it}")?;
                }
                if items.len() == 1 {
                    f.write_str(",")?;
                }
                f.write_str(")")
            }
            PyValue::Dict(items) => {
                f.write_str("{")?;
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// `b'...'`, as Python writes a `bytes` object.
struct BytesLiteral<'b>(&'b [u8]);

impl fmt::Display for BytesLiteral<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("b'")?;
        for &c in self.0 {
            match c {
                b'\'' => f.write_str("\\'")?,
                b'\\' => f.write_str("\\\\")?,
                0x20..=0x7e => write!(f, "{}", c as char)?,
                _ => write!(f, "\\x{c:02x}")?,
            }
        }
        f.write_str("'")
    }
}

struct LiteralParser<'a> {
    s: &'a [u8],
    pos: usize,
    text: &'a str,
}

impl LiteralParser<'_> {
    fn err(&self, msg: &str) -> Error {
        Error::invalid(format!("Python literal {:?}: {msg} at character {}", self.text, self.pos))
    }
    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn word(&mut self, w: &str) -> bool {
        if self.s[self.pos..].starts_with(w.as_bytes()) {
            let after = self.s.get(self.pos + w.len()).copied();
            if !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_') {
                self.pos += w.len();
                return true;
            }
        }
        false
    }

    fn value(&mut self, depth: usize) -> Result<PyValue> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.ws();
        let c = self.peek().ok_or_else(|| self.err("expected a value"))?;
        match c {
            b'[' => {
                self.pos += 1;
                Ok(PyValue::List(self.items(b']', depth)?.0))
            }
            b'(' => {
                self.pos += 1;
                let (items, trailing_comma) = self.items(b')', depth)?;
                if items.len() == 1 && !trailing_comma {
                    return Ok(items.into_iter().next().unwrap());
                }
                Ok(PyValue::Tuple(items))
            }
            b'{' => {
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.eat(b'}') {
                        break;
                    }
                    // Each key is parsed once: looking ahead by parsing the first key twice
                    // would take 2^depth steps on keys that are themselves dicts.
                    let k = self.value(depth + 1)?;
                    if !self.eat(b':') {
                        return Err(self.err(if items.is_empty() {
                            "sets are not supported (only dicts use braces)"
                        } else {
                            "expected ':'"
                        }));
                    }
                    let v = self.value(depth + 1)?;
                    items.push((k, v));
                    if self.eat(b'}') {
                        break;
                    }
                    if !self.eat(b',') {
                        return Err(self.err("expected ',' or '}'"));
                    }
                }
                Ok(PyValue::Dict(items))
            }
            b'\'' | b'"' => Ok(PyValue::Str(
                String::from_utf8(self.quoted(false)?).map_err(|_| self.err("invalid UTF-8"))?,
            )),
            b'b' if matches!(self.s.get(self.pos + 1), Some(b'\'') | Some(b'"')) => {
                self.pos += 1;
                Ok(PyValue::Bytes(self.quoted(true)?))
            }
            _ => {
                if self.word("None") {
                    return Ok(PyValue::None);
                }
                if self.word("True") {
                    return Ok(PyValue::Bool(true));
                }
                if self.word("False") {
                    return Ok(PyValue::Bool(false));
                }
                self.number()
            }
        }
    }

    fn items(&mut self, close: u8, depth: usize) -> Result<(Vec<PyValue>, bool)> {
        let mut items = Vec::new();
        let mut trailing = false;
        loop {
            if self.eat(close) {
                return Ok((items, trailing));
            }
            items.push(self.value(depth + 1)?);
            trailing = false;
            if self.eat(close) {
                return Ok((items, trailing));
            }
            if !self.eat(b',') {
                return Err(self.err("expected ','"));
            }
            trailing = true;
        }
    }

    fn quoted(&mut self, bytes: bool) -> Result<Vec<u8>> {
        let q = self.s[self.pos];
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek().ok_or_else(|| self.err("unterminated string"))?;
            self.pos += 1;
            if c == q {
                return Ok(out);
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let e = self.peek().ok_or_else(|| self.err("unterminated escape"))?;
            self.pos += 1;
            match e {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'0' => out.push(0),
                b'\\' | b'\'' | b'"' => out.push(e),
                b'x' => {
                    let h = self.s.get(self.pos..self.pos + 2).ok_or_else(|| self.err("short \\x escape"))?;
                    let v = u8::from_str_radix(std::str::from_utf8(h).unwrap_or("zz"), 16).map_err(|_| self.err("bad \\x escape"))?;
                    self.pos += 2;
                    if bytes || v < 0x80 {
                        out.push(v);
                    } else {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(char::from(v).encode_utf8(&mut buf).as_bytes());
                    }
                }
                _ => return Err(self.err("unsupported escape")),
            }
        }
    }

    fn number(&mut self) -> Result<PyValue> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'-') | Some(b'+')) {
            self.pos += 1;
        }
        if self.word("inf") {
            let neg = self.s[start] == b'-';
            return Ok(PyValue::Float(if neg { f64::NEG_INFINITY } else { f64::INFINITY }));
        }
        if self.word("nan") {
            return Ok(PyValue::Float(f64::NAN));
        }
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'+' | b'-' | b'_'))
        {
            let c = self.s[self.pos];
            if (c == b'+' || c == b'-') && !matches!(self.s[self.pos - 1], b'e' | b'E') {
                break;
            }
            self.pos += 1;
        }
        let tok = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("").replace('_', "");
        if tok.is_empty() || tok == "-" || tok == "+" {
            return Err(self.err("expected a value"));
        }
        let digits = tok.strip_prefix(['+', '-']).unwrap_or(&tok);
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            return tok
                .parse::<i64>()
                .map(PyValue::Int)
                .map_err(|_| self.err("integers outside the int64 range are not supported"));
        }
        tok.parse::<f64>().map(PyValue::Float).map_err(|_| self.err("not a number"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_values_pickle_and_print_as_their_plain_values() {
        for v in [
            PyValue::Bytes(vec![0, b'\'', 200]),
            PyValue::Int(-7),
            PyValue::Float(0.5),
            PyValue::Str("x".into()),
        ] {
            let o = ObjectValue::from(v.clone());
            assert_eq!(o.to_pickle(), v.to_pickle());
            assert_eq!(o.literal(), Some(v.to_string()));
            assert_eq!(ObjectValue::from_pickle(&v.to_pickle(), "t").unwrap(), o);
        }
        assert_eq!(ObjectValue::Pickle(b"N.".to_vec()).literal(), None);
    }

    #[test]
    fn pickle_roundtrip() {
        let v = PyValue::Dict(vec![
            (PyValue::Str("lr".into()), PyValue::Float(0.1)),
            (
                PyValue::Str("betas".into()),
                PyValue::Tuple(vec![PyValue::Float(0.9), PyValue::Float(0.999)]),
            ),
            (
                PyValue::Str("params".into()),
                PyValue::List(vec![PyValue::Str("net1.weight".into()), PyValue::Int(3)]),
            ),
            (PyValue::Str("blob".into()), PyValue::Bytes(vec![0, 200, 7])),
            (PyValue::Str("empty".into()), PyValue::Bytes(vec![])),
            (PyValue::Str("none".into()), PyValue::None),
            (PyValue::Str("flag".into()), PyValue::Bool(true)),
            (PyValue::Str("big".into()), PyValue::Int(-(1 << 50))),
            (PyValue::Str("t4".into()), PyValue::Tuple((0..5).map(PyValue::Int).collect())),
        ]);
        let p = v.to_pickle();
        assert_eq!(PyValue::from_pickle(&p, "t").unwrap(), Some(v));
    }

    #[test]
    fn literal_roundtrip() {
        for text in [
            "None",
            "True",
            "[1, 2.5, 'a\\'b']",
            "(0.9, 0.999)",
            "(1,)",
            "{'a': b'\\x00\\xff', 'b': []}",
            "-3",
            "1e-08",
            "inf",
            "()",
        ] {
            let v = PyValue::parse_literal(text).unwrap();
            let again = PyValue::parse_literal(&v.to_string()).unwrap();
            assert_eq!(v, again, "{text} -> {v}");
        }
        assert_eq!(PyValue::parse_literal("(5)").unwrap(), PyValue::Int(5));
        assert_eq!(PyValue::parse_literal("1e-08").unwrap(), PyValue::Float(1e-8));
        assert!(PyValue::parse_literal("[1, 2").is_err());
        assert!(PyValue::parse_literal("foo").is_err());
        assert!(PyValue::parse_literal("1 2").is_err());
        let e = PyValue::parse_literal("{1, 2}").unwrap_err();
        assert!(e.to_string().contains("sets are not supported"), "{e}");
        assert!(PyValue::parse_literal("{1: 2, 3}")
            .unwrap_err()
            .to_string()
            .contains("expected ':'"));
    }

    #[test]
    fn nested_dict_keys_parse_in_linear_time() {
        // {{{...{1: 0}...: 0}: 0}: 0}, 200 deep: each level's key is a dict.
        let mut text = "1".to_string();
        for _ in 0..200 {
            text = format!("{{{text}: 0}}");
        }
        let t = std::time::Instant::now();
        let v = PyValue::parse_literal(&text).unwrap();
        assert!(t.elapsed().as_secs() < 5);
        assert_eq!(PyValue::parse_literal(&v.to_string()).unwrap(), v);
    }

    #[test]
    fn shared_references_are_refused_or_kept_opaque() {
        // `pickle.dumps([[[0] * 1000] * 1000] * 1000, protocol=2)`: 6 KB sharing one list,
        // 10^9 values (32 GB) as a tree.
        let data = crate::format::pickle::tests::nested_shared_lists(3, 1000);
        let e = PyValue::from_pickle(&data, "key \"blob\"").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        assert!(e.to_string().contains("key \"blob\": pickle expands past"), "{e}");
        // As an object item it is kept byte for byte.
        assert_eq!(ObjectValue::from_pickle(&data, "t").unwrap(), ObjectValue::Pickle(data.clone()));
        // Two levels (10^6 zeros, 32 MB) from 4 KB: also past 64 bytes per input byte.
        let two = crate::format::pickle::tests::nested_shared_lists(2, 1000);
        assert!(PyValue::from_pickle(&two, "t").is_err());
        // Small sharing is fine: the value comes out whole.
        let small = crate::format::pickle::tests::nested_shared_lists(2, 10);
        let v = PyValue::from_pickle(&small, "t").unwrap().unwrap();
        let row = PyValue::List(vec![PyValue::Int(0); 10]);
        assert_eq!(v, PyValue::List(vec![row; 10]));
    }

    #[test]
    fn a_memoized_string_repeated_is_charged_per_copy() {
        let mut w = PickleWriter::new(2);
        w.empty_list().mark();
        w.str(&"s".repeat(1 << 20));
        let idx = w.memoize();
        for _ in 0..100_000 {
            w.get(idx);
        }
        w.appends();
        let data = w.finish();
        assert!(data.len() < (1 << 20) + 300_000);
        let e = PyValue::from_pickle(&data, "t").unwrap_err();
        assert!(e.to_string().contains("pickle expands past"), "{e}");
    }

    #[test]
    fn a_list_containing_itself_ends_quickly() {
        // l = []; l.append(l); l.append(l): a cycle, 2^depth paths.
        let data = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'h', 0, b'a', b'.'];
        let t = std::time::Instant::now();
        assert!(!matches!(PyValue::from_pickle(&data, "t"), Ok(Some(_))));
        assert!(matches!(ObjectValue::from_pickle(&data, "t").unwrap(), ObjectValue::Pickle(_)));
        assert!(t.elapsed().as_secs() < 5);
    }

    #[test]
    fn objects_are_not_plain_values() {
        let mut w = PickleWriter::new(2);
        w.global("collections", "OrderedDict").empty_tuple().reduce();
        assert_eq!(PyValue::from_pickle(&w.finish(), "t").unwrap(), None);
    }
}

/// A non-tensor entry of a state dict, as libdcp stores and returns it.
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectValue {
    /// A Python `bytes` object.
    Bytes(Vec<u8>),
    /// A Python `int` that fits in 64 bits.
    Int(i64),
    /// A Python `float`.
    Float(f64),
    /// Any other plain value (str, bool, None, list, tuple, dict of those).
    Py(PyValue),
    /// A pickle libdcp does not interpret (a class instance, for example), kept byte for byte.
    Pickle(Vec<u8>),
}

impl ObjectValue {
    /// The pickle stored as the item's `data.pkl`.
    pub fn to_pickle(&self) -> Vec<u8> {
        // The same protocol as `PyValue::to_pickle`.
        let mut w = PickleWriter::new(2);
        match self {
            ObjectValue::Bytes(b) => {
                w.bytes(b);
            }
            ObjectValue::Int(v) => {
                w.int(*v);
            }
            ObjectValue::Float(v) => {
                w.float(*v);
            }
            ObjectValue::Py(v) => v.write(&mut w),
            ObjectValue::Pickle(p) => return p.clone(),
        }
        w.finish()
    }

    /// The value of the pickle `data` (`what` names it in errors); a pickle that is not a plain
    /// value stays [`ObjectValue::Pickle`].
    pub fn from_pickle(data: &[u8], what: &str) -> Result<ObjectValue> {
        Ok(match pickle::parse(data, what) {
            Ok(g) => Self::from_graph(&g, data),
            // Pickles with opcodes the VM does not run stay opaque.
            Err(_) => ObjectValue::Pickle(data.to_vec()),
        })
    }

    /// The value of a parsed pickle (`raw` is its bytes, kept when it is not a plain value).
    /// A plain value that would expand past [`PyValue::budget`] when materialised (references
    /// shared in the pickle, copied in a `PyValue`) stays an opaque pickle too: its bytes come
    /// back exactly as saved, at the cost of their own length.
    pub fn from_graph(g: &Graph, raw: &[u8]) -> ObjectValue {
        match PyValue::from_graph(g, g.root, &PyValue::budget(raw.len(), "object")) {
            Ok(Some(v)) => v.into(),
            Ok(None) | Err(_) => ObjectValue::Pickle(raw.to_vec()),
        }
    }

    /// The value in Python literal syntax; `None` for a pickle, which has none.
    pub fn literal(&self) -> Option<String> {
        Some(match self {
            ObjectValue::Bytes(b) => BytesLiteral(b).to_string(),
            ObjectValue::Int(i) => PyValue::Int(*i).to_string(),
            ObjectValue::Float(f) => PyValue::Float(*f).to_string(),
            ObjectValue::Py(p) => p.to_string(),
            ObjectValue::Pickle(_) => return None,
        })
    }

    /// What the value is, in a word (`bytes`, `int`, `float`, `object`, `pickle`).
    pub fn kind_name(&self) -> &'static str {
        match self {
            ObjectValue::Bytes(_) => "bytes",
            ObjectValue::Int(_) => "int",
            ObjectValue::Float(_) => "float",
            ObjectValue::Py(_) => "object",
            ObjectValue::Pickle(_) => "pickle",
        }
    }
}

/// Floats below this magnitude with no fractional part convert to `i64` exactly. `i64::MAX` is
/// about 9.223e18; staying under 9.2e18 keeps clear of the top of the range, where a float cast
/// to `i64` would saturate instead of converting.
pub const MAX_FLOAT_AS_INT: f64 = 9.2e18;

/// Typed reads of a non-tensor value, for callers that know what they saved (the C API's
/// `_get_int`, `_get_bool`, `_get_doubles`, ...). A value of another type gives
/// [`ErrorKind::Mismatch`](crate::error::ErrorKind) naming `fqn` and the type found.
impl ObjectValue {
    /// An int, or a float with an integral value below 9.2e18.
    pub fn to_int(&self, fqn: &str) -> Result<i64> {
        match self {
            ObjectValue::Int(i) => Ok(*i),
            ObjectValue::Float(f) if f.fract() == 0.0 && f.abs() < MAX_FLOAT_AS_INT => Ok(*f as i64),
            other => Err(Error::mismatch(format!("key {fqn:?} holds a {}, not an int", other.kind_name()))),
        }
    }

    /// A float, or an int (rounded to the nearest float).
    pub fn to_float(&self, fqn: &str) -> Result<f64> {
        match self {
            ObjectValue::Float(f) => Ok(*f),
            ObjectValue::Int(i) => Ok(*i as f64),
            other => Err(Error::mismatch(format!("key {fqn:?} holds a {}, not a float", other.kind_name()))),
        }
    }

    /// A Python `bool` (ints do not convert).
    pub fn to_bool(&self, fqn: &str) -> Result<bool> {
        match self {
            ObjectValue::Py(PyValue::Bool(b)) => Ok(*b),
            other => Err(other.wrong_type(fqn, "a bool")),
        }
    }

    /// The items of a list or tuple of ints and floats (bools are not numbers here), in order;
    /// ints convert as in [`ObjectValue::to_float`].
    pub fn to_floats(&self, fqn: &str) -> Result<Vec<f64>> {
        let want = "a list or tuple of numbers";
        self.sequence(fqn, want)?
            .iter()
            .map(|v| match v {
                PyValue::Float(f) => Ok(*f),
                PyValue::Int(i) => Ok(*i as f64),
                _ => Err(self.wrong_type(fqn, want)),
            })
            .collect()
    }

    /// The items of a list or tuple of strings, in order.
    pub fn to_strs(&self, fqn: &str) -> Result<Vec<&str>> {
        let want = "a list or tuple of strings";
        self.sequence(fqn, want)?
            .iter()
            .map(|v| match v {
                PyValue::Str(s) => Ok(s.as_str()),
                _ => Err(self.wrong_type(fqn, want)),
            })
            .collect()
    }

    /// The raw bytes of a bytes value; the pickle of any other value.
    pub fn bytes_or_pickle(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            ObjectValue::Bytes(b) | ObjectValue::Pickle(b) => std::borrow::Cow::Borrowed(b),
            other => std::borrow::Cow::Owned(other.to_pickle()),
        }
    }

    /// [`ObjectValue::literal`], with [`ErrorKind::Unsupported`](crate::error::ErrorKind) naming
    /// `fqn` for an opaque pickle.
    pub fn to_literal(&self, fqn: &str) -> Result<String> {
        self.literal()
            .ok_or_else(|| Error::unsupported(format!("key {fqn:?} holds a pickled object that has no literal form")))
    }

    fn sequence(&self, fqn: &str, want: &str) -> Result<&[PyValue]> {
        match self {
            ObjectValue::Py(PyValue::List(items) | PyValue::Tuple(items)) => Ok(items),
            other => Err(other.wrong_type(fqn, want)),
        }
    }

    /// "key "x" holds (0.9, 'a') where a list or tuple of numbers was expected".
    fn wrong_type(&self, fqn: &str, want: &str) -> Error {
        /// Longer literals are cut to this many characters in the message.
        const SHOWN: usize = 80;
        let found = match self.literal() {
            Some(l) if l.chars().count() <= SHOWN => l,
            Some(l) => format!("{}...", l.chars().take(SHOWN).collect::<String>()),
            None => "a pickled object".to_string(),
        };
        Error::mismatch(format!("key {fqn:?} holds {found} where {want} was expected"))
    }
}

impl From<PyValue> for ObjectValue {
    /// Bytes, ints and floats get their own variants; other plain values stay `Py`.
    fn from(v: PyValue) -> ObjectValue {
        match v {
            PyValue::Bytes(b) => ObjectValue::Bytes(b),
            PyValue::Int(i) => ObjectValue::Int(i),
            PyValue::Float(f) => ObjectValue::Float(f),
            other => ObjectValue::Py(other),
        }
    }
}

#[cfg(test)]
mod typed_read_tests {
    use super::*;
    use crate::error::ErrorKind;

    fn lit(text: &str) -> ObjectValue {
        PyValue::parse_literal(text).unwrap().into()
    }

    #[test]
    fn ints_and_integral_floats() {
        assert_eq!(lit("-7").to_int("k").unwrap(), -7);
        assert_eq!(lit("3.0").to_int("k").unwrap(), 3);
        assert_eq!(ObjectValue::Float(-9.1e18).to_int("k").unwrap(), -9_100_000_000_000_000_000);
        for bad in ["3.5", "9.2e18", "True", "'3'", "b'3'"] {
            let e = lit(bad).to_int("k").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{bad}");
            assert!(e.message().contains("\"k\""), "{bad}: {}", e.message());
        }
        assert_eq!(lit("5").to_float("k").unwrap(), 5.0);
        assert_eq!(lit("None").to_float("k").unwrap_err().kind(), ErrorKind::Mismatch);
    }

    #[test]
    fn bools_sequences_and_strings() {
        assert!(lit("True").to_bool("k").unwrap());
        assert!(!lit("False").to_bool("k").unwrap());
        assert_eq!(lit("1").to_bool("k").unwrap_err().kind(), ErrorKind::Mismatch);
        assert_eq!(lit("(0.9, 0.999)").to_floats("k").unwrap(), [0.9, 0.999]);
        assert_eq!(lit("[1, 2.5]").to_floats("k").unwrap(), [1.0, 2.5]);
        assert!(lit("[]").to_floats("k").unwrap().is_empty());
        let e = lit("(0.9, True)").to_floats("k").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch);
        assert!(e.message().contains("(0.9, True)"), "{}", e.message());
        assert_eq!(lit("['a', 'b.c']").to_strs("k").unwrap(), ["a", "b.c"]);
        assert_eq!(lit("('x',)").to_strs("k").unwrap(), ["x"]);
        assert_eq!(lit("['a', 1]").to_strs("k").unwrap_err().kind(), ErrorKind::Mismatch);
        assert_eq!(lit("'a'").to_strs("k").unwrap_err().kind(), ErrorKind::Mismatch);
        let opaque = ObjectValue::Pickle(vec![0x80, 2]);
        assert!(opaque.to_bool("k").unwrap_err().message().contains("a pickled object"));
        assert_eq!(opaque.to_literal("k").unwrap_err().kind(), ErrorKind::Unsupported);
        assert_eq!(&*opaque.bytes_or_pickle(), &[0x80, 2]);
    }
}
