//! A small pickle emitter and a small pickle virtual machine.
//!
//! The emitter writes just the opcodes torch's `.metadata` and `torch.save` items need. The
//! reader runs any protocol 0-5 pickle made of data opcodes into an arena of [`Node`]s without
//! importing or calling anything: a `GLOBAL` stays a name, a `REDUCE` stays "call this with those
//! args", a `NEWOBJ`+`BUILD` stays "object of this class with that state". The format modules then
//! interpret those shapes. Parsing is bounded: every read is checked, lengths are capped by the
//! input, and errors name the byte offset.
//!
//! Memory stays linear in the input: the VM makes at most one node per opcode byte (strings and
//! bytes no longer than the bytes they come from), and a value fetched from the memo (`BINGET`) or
//! named twice is the same node, never a copy. Readers that turn a graph into owned values (a
//! tree, where sharing becomes copying) charge what they materialise against a [`Budget`]
//! proportional to the input, so a few kilobytes of shared references cannot expand to gigabytes.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::collections::HashMap;

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

/// Emits pickle opcodes. Protocol 2 (what `torch.save` uses) or 4 (what DCP's `.metadata` uses).
pub struct PickleWriter {
    out: Vec<u8>,
    protocol: u8,
    memo_len: u32,
    globals: HashMap<(String, String), u32>,
    strings: HashMap<String, u32>,
}

impl PickleWriter {
    pub fn new(protocol: u8) -> Self {
        let mut w = PickleWriter {
            out: Vec::new(),
            protocol,
            memo_len: 0,
            globals: HashMap::new(),
            strings: HashMap::new(),
        };
        w.out.extend_from_slice(&[op::PROTO, protocol]);
        w
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(op::STOP);
        self.out
    }

    fn op(&mut self, code: u8) -> &mut Self {
        self.out.push(code);
        self
    }

    /// Stores the top of the stack in the memo and returns its index.
    pub fn memoize(&mut self) -> u32 {
        let idx = self.memo_len;
        self.memo_len += 1;
        if self.protocol >= 4 {
            self.out.push(op::MEMOIZE);
        } else if idx < 256 {
            self.out.extend_from_slice(&[op::BINPUT, idx as u8]);
        } else {
            self.out.push(op::LONG_BINPUT);
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
        idx
    }

    pub fn get(&mut self, idx: u32) -> &mut Self {
        if idx < 256 {
            self.out.extend_from_slice(&[op::BINGET, idx as u8]);
        } else {
            self.out.push(op::LONG_BINGET);
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
        self
    }

    pub fn mark(&mut self) -> &mut Self {
        self.op(op::MARK)
    }
    pub fn none(&mut self) -> &mut Self {
        self.op(op::NONE)
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        if self.protocol >= 2 {
            self.op(if v { op::NEWTRUE } else { op::NEWFALSE })
        } else {
            self.out.extend_from_slice(if v { b"I01\n" } else { b"I00\n" });
            self
        }
    }

    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[op::BININT1, v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(op::BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(op::BININT);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            let bytes = v.to_le_bytes();
            // Minimal two's-complement length, as Python writes it.
            let mut n = 8;
            while n > 1 {
                let top = bytes[n - 1];
                let next_sign = bytes[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[op::LONG1, n as u8]);
            self.out.extend_from_slice(&bytes[..n]);
        }
        self
    }

    pub fn float(&mut self, v: f64) -> &mut Self {
        self.out.push(op::BINFLOAT);
        self.out.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A str, not memoized.
    pub fn str(&mut self, s: &str) -> &mut Self {
        let b = s.as_bytes();
        if b.len() < 256 && self.protocol >= 4 {
            self.out.extend_from_slice(&[op::SHORT_BINUNICODE, b.len() as u8]);
        } else if b.len() <= u32::MAX as usize {
            self.out.push(op::BINUNICODE);
            self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        } else {
            self.out.push(op::BINUNICODE8);
            self.out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        }
        self.out.extend_from_slice(b);
        self
    }

    /// A str that is memoized on first use and fetched from the memo afterwards.
    pub fn str_memo(&mut self, s: &str) -> &mut Self {
        if let Some(&idx) = self.strings.get(s) {
            return self.get(idx);
        }
        self.str(s);
        let idx = self.memoize();
        self.strings.insert(s.to_string(), idx);
        self
    }

    /// A Python `bytes` object. Protocol 2 has no bytes opcode: Python pickles bytes there as
    /// `_codecs.encode(<latin-1 str>, 'latin1')` (and `b''` as `__builtin__.bytes()`).
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        if self.protocol >= 3 {
            if b.len() < 256 {
                self.out.extend_from_slice(&[op::SHORT_BINBYTES, b.len() as u8]);
            } else if b.len() <= u32::MAX as usize {
                self.out.push(op::BINBYTES);
                self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            } else {
                self.out.push(op::BINBYTES8);
                self.out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            }
            self.out.extend_from_slice(b);
            return self;
        }
        if b.is_empty() {
            self.global("__builtin__", "bytes");
            return self.empty_tuple().reduce();
        }
        self.global("_codecs", "encode");
        let latin1: String = b.iter().map(|&c| c as char).collect();
        self.str(&latin1);
        self.memoize();
        self.str_memo("latin1");
        self.tuple(2).reduce()
    }

    /// A global (`module.name`), memoized so repeated uses cost a BINGET.
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        let key = (module.to_string(), name.to_string());
        if let Some(&idx) = self.globals.get(&key) {
            return self.get(idx);
        }
        if self.protocol >= 4 {
            self.str_memo(module);
            self.str_memo(name);
            self.out.push(op::STACK_GLOBAL);
        } else {
            self.out.push(op::GLOBAL);
            self.out.extend_from_slice(module.as_bytes());
            self.out.push(b'\n');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'\n');
        }
        let idx = self.memoize();
        self.globals.insert(key, idx);
        self
    }

    pub fn empty_tuple(&mut self) -> &mut Self {
        self.op(op::EMPTY_TUPLE)
    }
    /// Builds a tuple of the top `n` stack items; for n > 3 the caller must have pushed a MARK
    /// before them.
    pub fn tuple(&mut self, n: usize) -> &mut Self {
        match n {
            0 => self.op(op::EMPTY_TUPLE),
            1 => self.op(op::TUPLE1),
            2 => self.op(op::TUPLE2),
            3 => self.op(op::TUPLE3),
            _ => self.op(op::TUPLE),
        }
    }
    /// A tuple of ints, e.g. a torch.Size's argument.
    pub fn int_tuple(&mut self, vals: &[u64]) -> &mut Self {
        if vals.len() > 3 {
            self.mark();
        }
        for &v in vals {
            self.int(v as i64);
        }
        self.tuple(vals.len())
    }
    pub fn empty_dict(&mut self) -> &mut Self {
        self.op(op::EMPTY_DICT)
    }
    pub fn empty_list(&mut self) -> &mut Self {
        self.op(op::EMPTY_LIST)
    }
    pub fn setitems(&mut self) -> &mut Self {
        self.op(op::SETITEMS)
    }
    pub fn setitem(&mut self) -> &mut Self {
        self.op(op::SETITEM)
    }
    pub fn append(&mut self) -> &mut Self {
        self.op(op::APPEND)
    }
    pub fn appends(&mut self) -> &mut Self {
        self.op(op::APPENDS)
    }
    pub fn reduce(&mut self) -> &mut Self {
        self.op(op::REDUCE)
    }
    pub fn newobj(&mut self) -> &mut Self {
        self.op(op::NEWOBJ)
    }
    pub fn build(&mut self) -> &mut Self {
        self.op(op::BUILD)
    }
    pub fn binpersid(&mut self) -> &mut Self {
        self.op(op::BINPERSID)
    }
    /// Raw opcodes copied from another pickle body (without its PROTO and STOP).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

pub type NodeId = usize;

/// A value produced by the pickle VM. Containers refer to other nodes by id, so values shared
/// through the memo are shared here too.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<NodeId>),
    List(Vec<NodeId>),
    Dict(Vec<(NodeId, NodeId)>),
    Set(Vec<NodeId>),
    /// `module.name`: both are `Str` nodes (shared with the strings a `STACK_GLOBAL` consumed).
    Global {
        module: NodeId,
        name: NodeId,
    },
    /// `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), with the state given by
    /// a later BUILD.
    Call {
        callable: NodeId,
        args: NodeId,
        state: Option<NodeId>,
    },
    /// A persistent id (torch.save's storage references).
    PersId(NodeId),
}

/// The result of running a pickle: all nodes and the root.
#[derive(Debug)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'a str,
    nodes: Vec<Node>,
    stack: Vec<NodeId>,
    marks: Vec<usize>,
    memo: HashMap<u32, NodeId>,
}

/// Runs a pickle. `what` names the source (a file, a key) in error messages.
pub fn parse(data: &[u8], what: &str) -> Result<Graph> {
    let mut vm = Vm {
        data,
        pos: 0,
        what,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    Ok(Graph { nodes: vm.nodes, root })
}

impl<'a> Vm<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        // The offset is within the pickle; a caller that knows where the pickle sits rebases it.
        Error::corrupt(format!("{}: invalid pickle at byte {}: {msg}", self.what, self.pos)).with_offset(self.pos as u64)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            Error::corrupt(format!(
                "{}: pickle truncated: needs {n} bytes at byte {} of {}",
                self.what,
                self.pos,
                self.data.len()
            ))
            .with_offset(self.pos as u64)
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len64(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err("length does not fit in memory"))
    }
    /// A text argument read as a number.
    fn line_num<T: std::str::FromStr>(&self, l: &[u8], what: &str) -> Result<T> {
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.err(what))
    }

    fn line(&mut self) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated text argument"))?;
        let s = &rest[..n];
        self.pos += n + 1;
        Ok(s)
    }
    fn utf8(&self, b: &[u8]) -> Result<String> {
        String::from_utf8(b.to_vec()).map_err(|_| self.err("invalid UTF-8 in string"))
    }

    fn push(&mut self, n: Node) {
        self.nodes.push(n);
        self.stack.push(self.nodes.len() - 1);
    }
    fn pop(&mut self) -> Result<NodeId> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err("stack underflow (pop past a mark)"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&self) -> Result<NodeId> {
        self.stack.last().copied().ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<NodeId>> {
        let m = self.marks.pop().ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK beyond stack"));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let top = self.top()?;
        self.memo.insert(idx, top);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let id = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo index {idx} is not set")))?;
        self.stack.push(id);
        Ok(())
    }

    fn run(&mut self) -> Result<NodeId> {
        loop {
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let root = self.pop()?;
                    return Ok(root);
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                op::NONE => self.push(Node::None),
                op::NEWTRUE => self.push(Node::Bool(true)),
                op::NEWFALSE => self.push(Node::Bool(false)),
                op::BININT => {
                    let v = self.u32()? as i32;
                    self.push(Node::Int(v as i64))
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64))
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Node::Int(v as i64))
                }
                op::LONG1 => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(long_node(b))
                }
                op::LONG4 => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(long_node(b))
                }
                op::INT => {
                    let l = self.line()?;
                    let node = match l {
                        b"00" => Node::Bool(false),
                        b"01" => Node::Bool(true),
                        _ => Node::Int(self.line_num(l, "bad INT")?),
                    };
                    self.push(node)
                }
                op::LONG => {
                    let l = self.line()?;
                    let s = std::str::from_utf8(l).map_err(|_| self.err("bad LONG"))?.trim_end_matches('L');
                    let v: i64 = s.parse().map_err(|_| self.err("LONG out of range"))?;
                    self.push(Node::Int(v))
                }
                op::BINFLOAT => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Node::Float(v))
                }
                op::FLOAT => {
                    let l = self.line()?;
                    let v: f64 = self.line_num(l, "bad FLOAT")?;
                    self.push(Node::Float(v))
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.push(Node::Str(s))
                }
                op::BINUNICODE => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.push(Node::Str(s))
                }
                op::BINUNICODE8 => {
                    let n = self.len64()?;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.push(Node::Str(s))
                }
                op::UNICODE => {
                    let l = self.line()?;
                    let s = self.utf8(l)?;
                    self.push(Node::Str(s))
                }
                op::SHORT_BINBYTES | op::SHORT_BINSTRING => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b))
                }
                op::BINBYTES | op::BINSTRING => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b))
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.len64()?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b))
                }
                op::STRING => {
                    let l = self.line()?;
                    let t = l.strip_prefix(b"'").and_then(|x| x.strip_suffix(b"'")).unwrap_or(l);
                    self.push(Node::Bytes(t.to_vec()))
                }
                op::EMPTY_TUPLE => self.push(Node::Tuple(vec![])),
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))
                }
                op::EMPTY_LIST => self.push(Node::List(vec![])),
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    match &mut self.nodes[l] {
                        Node::List(items) => items.push(v),
                        _ => return Err(self.err("APPEND to a non-list")),
                    }
                }
                op::APPENDS => {
                    let vals = self.pop_mark()?;
                    let l = self.top()?;
                    match &mut self.nodes[l] {
                        Node::List(items) => items.extend(vals),
                        _ => return Err(self.err("APPENDS to a non-list")),
                    }
                }
                op::EMPTY_DICT => self.push(Node::Dict(vec![])),
                op::DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("DICT with an odd number of items"));
                    }
                    let pairs = items.chunks(2).map(|c| (c[0], c[1])).collect();
                    self.push(Node::Dict(pairs))
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    match &mut self.nodes[d] {
                        Node::Dict(items) => items.push((k, v)),
                        _ => return Err(self.err("SETITEM on a non-dict")),
                    }
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let d = self.top()?;
                    match &mut self.nodes[d] {
                        Node::Dict(existing) => existing.extend(items.chunks(2).map(|c| (c[0], c[1]))),
                        _ => return Err(self.err("SETITEMS on a non-dict")),
                    }
                }
                op::EMPTY_SET => self.push(Node::Set(vec![])),
                op::ADDITEMS => {
                    let vals = self.pop_mark()?;
                    let s = self.top()?;
                    match &mut self.nodes[s] {
                        Node::Set(items) => items.extend(vals),
                        _ => return Err(self.err("ADDITEMS on a non-set")),
                    }
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items))
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let module = self.utf8(module)?;
                    let name = self.line()?;
                    let name = self.utf8(name)?;
                    self.nodes.push(Node::Str(module));
                    self.nodes.push(Node::Str(name));
                    let n = self.nodes.len();
                    self.push(Node::Global {
                        module: n - 2,
                        name: n - 1,
                    })
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Str(_), Node::Str(_)) = (&self.nodes[module], &self.nodes[name]) else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    // The strings are referenced, not copied: a memoized string fetched many
                    // times costs one node each time, not its length.
                    self.push(Node::Global { module, name })
                }
                op::REDUCE | op::NEWOBJ | op::NEWOBJ_EX => {
                    if code == op::NEWOBJ_EX {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.push(Node::Call {
                        callable,
                        args,
                        state: None,
                    })
                }
                op::BUILD => {
                    let st = self.pop()?;
                    let obj = self.top()?;
                    match &mut self.nodes[obj] {
                        Node::Call { state, .. } => *state = Some(st),
                        _ => return Err(self.err("BUILD on a value that is not an object")),
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    self.push(Node::PersId(pid))
                }
                op::PERSID => {
                    let l = self.line()?;
                    let s = self.utf8(l)?;
                    self.nodes.push(Node::Str(s));
                    let id = self.nodes.len() - 1;
                    self.push(Node::PersId(id))
                }
                op::MEMOIZE => {
                    let idx = self.memo.len() as u32;
                    self.memo_put(idx)?
                }
                op::BINPUT => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                op::PUT => {
                    let l = self.line()?;
                    let i: u32 = self.line_num(l, "bad PUT")?;
                    self.memo_put(i)?
                }
                op::BINGET => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                op::GET => {
                    let l = self.line()?;
                    let i: u32 = self.line_num(l, "bad GET")?;
                    self.memo_get(i)?
                }
                other => {
                    self.pos -= 1;
                    return Err(self.err(format!("unsupported opcode 0x{other:02x}")));
                }
            }
        }
    }
}

fn long_node(b: Vec<u8>) -> Node {
    if b.is_empty() {
        return Node::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut buf = if neg { [0xffu8; 8] } else { [0u8; 8] };
        buf[..b.len()].copy_from_slice(&b);
        return Node::Int(i64::from_le_bytes(buf));
    }
    Node::BigInt(b)
}

/// Typed access to a parsed graph, with errors that name the source.
impl Graph {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }
    pub fn as_str(&self, id: NodeId) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self, id: NodeId) -> Option<i64> {
        match &self.nodes[id] {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    pub fn as_seq(&self, id: NodeId) -> Option<&[NodeId]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_dict(&self, id: NodeId) -> Option<&[(NodeId, NodeId)]> {
        match &self.nodes[id] {
            Node::Dict(v) => Some(v),
            _ => None,
        }
    }
    pub fn is_none(&self, id: NodeId) -> bool {
        matches!(self.nodes[id], Node::None)
    }
    /// `Some((module, name))` when the node is a global.
    pub fn as_global(&self, id: NodeId) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Global { module, name } => Some((self.as_str(*module)?, self.as_str(*name)?)),
            _ => None,
        }
    }
    /// For a REDUCE/NEWOBJ node: the global called, its args node, and the BUILD state.
    pub fn as_call(&self, id: NodeId) -> Option<((&str, &str), NodeId, Option<NodeId>)> {
        match &self.nodes[id] {
            Node::Call { callable, args, state, .. } => Some((self.as_global(*callable)?, *args, *state)),
            _ => None,
        }
    }
    /// Looks up a str key in a dict node.
    pub fn dict_get(&self, dict: NodeId, key: &str) -> Option<NodeId> {
        self.as_dict(dict)?
            .iter()
            .find(|(k, _)| self.as_str(*k) == Some(key))
            .map(|(_, v)| *v)
    }
    /// [`Graph::dict_get`], charging `budget` one unit per item it looks at (a dict reached many
    /// times through the memo costs its length each time).
    pub fn dict_get_charged(&self, dict: NodeId, key: &str, budget: &Budget) -> Result<Option<NodeId>> {
        let Some(items) = self.as_dict(dict) else {
            return Ok(None);
        };
        for (i, &(k, v)) in items.iter().enumerate() {
            if self.as_str(k) == Some(key) {
                budget.charge(i as u64 + 1)?;
                return Ok(Some(v));
            }
        }
        budget.charge(items.len() as u64)?;
        Ok(None)
    }
}

/// What turning a pickle [`Graph`] into owned values may cost. The graph shares what the pickle
/// shares (memo references); a tree of owned values copies it once per reference, which is how
/// a 6 KB pickle (`[[[0] * 1000] * 1000] * 1000`) or a memo reference repeated a million times
/// would expand to gigabytes. Decoders charge every byte they materialise and every item they
/// visit; the limit is `per_byte` times the pickle's length plus a floor, so real pickles, whose
/// decoded size is a small multiple of their length however large, always fit.
#[derive(Debug)]
pub struct Budget {
    what: String,
    input: usize,
    per_byte: u64,
    floor: u64,
    left: Cell<u64>,
}

impl Budget {
    /// A budget for decoding a pickle of `input` bytes; `what` names it (file, key) in the error.
    pub fn new(what: &str, input: usize, per_byte: u64, floor: u64) -> Budget {
        let limit = (input as u64).saturating_mul(per_byte).saturating_add(floor);
        Budget {
            what: what.to_string(),
            input,
            per_byte,
            floor,
            left: Cell::new(limit),
        }
    }

    pub fn limit(&self) -> u64 {
        (self.input as u64).saturating_mul(self.per_byte).saturating_add(self.floor)
    }

    /// Units charged so far.
    pub fn used(&self) -> u64 {
        self.limit() - self.left.get()
    }

    /// Takes `units` (bytes materialised, items visited) from the budget, or fails once it is spent.
    pub fn charge(&self, units: u64) -> Result<()> {
        match self.left.get().checked_sub(units) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.left.set(0);
                Err(Error::corrupt(format!(
                    "{}: pickle expands past {} bytes when decoded, from {} bytes of input (the limit is {} times its size plus {} KiB); \
                     refusing it as hostile or corrupt",
                    self.what,
                    self.limit(),
                    self.input,
                    self.per_byte,
                    self.floor >> 10
                )))
            }
        }
    }

    /// Charges `count` items of `each` units (checked: a count from the input may be huge).
    pub fn charge_items(&self, count: usize, each: usize) -> Result<()> {
        self.charge((count as u64).saturating_mul(each as u64))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ints_roundtrip() {
        for v in [
            0i64,
            1,
            255,
            256,
            65535,
            65536,
            -1,
            -129,
            i32::MAX as i64,
            i32::MIN as i64,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ] {
            let mut w = PickleWriter::new(2);
            w.int(v);
            let g = parse(&w.finish(), "test").unwrap();
            assert_eq!(g.as_int(g.root), Some(v), "value {v}");
        }
    }

    #[test]
    fn bytes_proto2_and_proto4() {
        for proto in [2u8, 4] {
            for b in [vec![], vec![0u8, 1, 0x80, 0xff, b'a'], (0..=255u8).collect::<Vec<_>>()] {
                let mut w = PickleWriter::new(proto);
                w.bytes(&b);
                let out = w.finish();
                let g = parse(&out, "t").unwrap();
                match g.node(g.root) {
                    Node::Bytes(x) => assert_eq!(x, &b),
                    Node::Call { .. } => {
                        // protocol 2 form: interpreted by pyobj; here check the shape.
                        let ((m, n), _, _) = g.as_call(g.root).unwrap();
                        assert!((m, n) == ("_codecs", "encode") || (m, n) == ("__builtin__", "bytes"));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }

    #[test]
    fn memo_shares_containers() {
        // outer = [inner] with inner memoized; then inner is fetched again and 7 appended to it.
        let data = [0x80, 2, b']', b']', b'q', 0, b'a', b'h', 0, b'K', 7, b'a', b'0', b'.'];
        let g = parse(&data, "t").unwrap();
        let outer = g.as_seq(g.root).unwrap();
        assert_eq!(outer.len(), 1);
        let inner = g.as_seq(outer[0]).unwrap();
        assert_eq!(g.as_int(inner[0]), Some(7));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for data in [
            &b""[..],
            b"\x80",
            b"\x80\x02K",
            b"\x80\x02a.",
            b"\x80\x02h\x05.",
            b"\xff",
            b"\x80\x02(t",
            b"\x80\x02X\xff\xff\xff\xff",
        ] {
            assert!(parse(data, "t").is_err(), "{data:?}");
        }
    }

    /// What Python's `pickle.dumps` writes (protocol 2) for `depth` nested lists of `width`
    /// items, each level the same list repeated: `[[[0] * 1000] * 1000] * 1000` is (3, 1000),
    /// 6014 bytes for 10^9 leaves.
    pub(crate) fn nested_shared_lists(depth: u8, width: usize) -> Vec<u8> {
        let mut out = vec![op::PROTO, 2];
        for level in 0..depth {
            out.extend_from_slice(&[op::EMPTY_LIST, op::BINPUT, level, op::MARK]);
        }
        for _ in 0..width {
            out.extend_from_slice(&[op::BININT1, 0]);
        }
        out.push(op::APPENDS);
        for level in (0..depth.saturating_sub(1)).rev() {
            for _ in 1..width {
                out.extend_from_slice(&[op::BINGET, level + 1]);
            }
            out.push(op::APPENDS);
        }
        out.push(op::STOP);
        out
    }

    #[test]
    fn shared_references_stay_shared() {
        let data = nested_shared_lists(3, 1000);
        assert_eq!(data.len(), 6014, "the same bytes as Python's pickle.dumps");
        let g = parse(&data, "t").unwrap();
        // Three lists and 1000 zeros: one node per opcode, not 10^9.
        assert_eq!(g.nodes.len(), 1003);
        let outer = g.as_seq(g.root).unwrap();
        assert_eq!(outer.len(), 1000);
        assert!(outer.iter().all(|&i| i == outer[0]), "the memo shares the inner list");
    }

    #[test]
    fn globals_reference_memoized_strings() {
        // A 100 KB module name, memoized, then 10000 STACK_GLOBALs of it: the graph holds the
        // string once.
        let big = "m".repeat(100_000);
        let mut w = PickleWriter::new(4);
        w.str(&big);
        w.memoize();
        w.str("n");
        w.memoize();
        w.empty_list().mark();
        for _ in 0..10_000 {
            w.get(0).get(1).raw(&[op::STACK_GLOBAL]);
        }
        w.appends();
        let data = w.finish();
        let g = parse(&data, "t").unwrap();
        let text: usize = g.nodes.iter().map(|n| if let Node::Str(s) = n { s.len() } else { 0 }).sum();
        assert_eq!(text, big.len() + 1);
        let items = g.as_seq(g.root).unwrap();
        assert_eq!(items.len(), 10_000);
        assert_eq!(g.as_global(items[9_999]), Some((big.as_str(), "n")));
    }

    #[test]
    fn budget_refuses_past_its_limit() {
        let b = Budget::new("key \"x\"", 100, 4, 1000);
        assert_eq!(b.limit(), 1400);
        b.charge(1000).unwrap();
        b.charge_items(100, 4).unwrap();
        assert_eq!(b.used(), 1400);
        let e = b.charge(1).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        assert!(e.to_string().contains("key \"x\": pickle expands past 1400 bytes"), "{e}");
        // A huge count cannot wrap around.
        let b = Budget::new("t", 0, 1, 10);
        assert!(b.charge_items(usize::MAX, usize::MAX).is_err());
    }

    #[test]
    fn charged_dict_lookups_cost_what_they_scan() {
        let mut w = PickleWriter::new(4);
        w.empty_dict().mark();
        for i in 0..100 {
            w.int(i).int(i);
        }
        w.str("k").int(7).setitems();
        let g = parse(&w.finish(), "t").unwrap();
        let b = Budget::new("t", 0, 0, 1000);
        assert_eq!(g.as_int(g.dict_get_charged(g.root, "k", &b).unwrap().unwrap()), Some(7));
        assert_eq!(b.used(), 101);
        assert_eq!(g.dict_get_charged(g.root, "absent", &b).unwrap(), None);
        assert_eq!(b.used(), 202);
    }

    #[test]
    fn globals_and_objects() {
        let mut w = PickleWriter::new(4);
        w.global("torch", "Size");
        w.int_tuple(&[2, 3]);
        w.tuple(1).reduce();
        let g = parse(&w.finish(), "t").unwrap();
        let ((m, n), args, _) = g.as_call(g.root).unwrap();
        assert_eq!((m, n), ("torch", "Size"));
        let inner = g.as_seq(args).unwrap();
        let dims: Vec<i64> = g.as_seq(inner[0]).unwrap().iter().map(|&i| g.as_int(i).unwrap()).collect();
        assert_eq!(dims, vec![2, 3]);
    }
}
