//! What a pickle would import: the (module, name) globals that Python's `pickle.load` looks up
//! (importing the module, running its code) and may call, found by walking the opcodes without
//! executing or building anything. Linear time; memory bounded by the input (strings are shared,
//! never copied per reference). Used by `dcp verify` to flag checkpoints that would run code
//! outside torch's own checkpoint classes when torch opens them with `weights_only=False`.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Distinct globals kept per pickle; more are counted in [`Scan::more`].
pub const MAX_GLOBALS: usize = 256;
/// Longest module or name kept (in bytes); longer ones are cut and end in `...`, so no copy or
/// comparison costs more than this, however often a huge memoized string is named.
pub const MAX_NAME: usize = 256;

/// `s` cut to at most [`MAX_NAME`] bytes (on a char boundary), marked when cut.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_NAME {
        return s;
    }
    let mut end = MAX_NAME - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One global a pickle refers to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GlobalRef {
    pub module: String,
    pub name: String,
    /// Byte offset of the opcode that names it (the first, if named several times).
    pub offset: u64,
}

impl GlobalRef {
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }
}

/// Module and name of a STACK_GLOBAL whose strings were not pushed as literals (computed by the
/// pickle itself): unknown, so never allowed.
pub const UNKNOWN: &str = "<computed>";
/// Module of an EXT1/EXT2/EXT4 reference (copyreg's extension registry); the name is the code.
pub const EXTENSION: &str = "<copyreg extension>";

#[derive(Debug, Default, PartialEq)]
pub struct Scan {
    /// Distinct globals in order of first reference (at most [`MAX_GLOBALS`]).
    pub globals: Vec<GlobalRef>,
    /// Further distinct globals not listed.
    pub more: usize,
    /// Why the walk stopped before STOP (truncated or malformed pickle); the globals before that
    /// point are listed.
    pub malformed: Option<String>,
}

impl Scan {
    /// The globals outside [`is_allowed`].
    pub fn disallowed(&self) -> impl Iterator<Item = &GlobalRef> {
        self.globals.iter().filter(|g| !is_allowed(&g.module, &g.name))
    }
}

#[derive(Clone)]
enum Val {
    Mark,
    Str(Rc<str>),
    Other,
}

struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    memo: HashMap<u64, Val>,
    seen: HashSet<(String, String)>,
    scan: Scan,
}

type Step<T> = std::result::Result<T, String>;

impl<'a> Walker<'a> {
    fn take(&mut self, n: u64) -> Step<&'a [u8]> {
        let start = self.pos;
        let end = (start as u64)
            .checked_add(n)
            .filter(|&e| e <= self.data.len() as u64)
            .ok_or_else(|| format!("truncated: {n} bytes wanted at offset {start}"))? as usize;
        self.pos = end;
        Ok(&self.data[start..end])
    }

    fn uint(&mut self, n: u64) -> Step<u64> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| acc << 8 | b as u64))
    }

    fn line(&mut self) -> Step<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated: no end of line after offset {}", self.pos))?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn pop(&mut self) -> Step<Val> {
        self.stack.pop().ok_or_else(|| format!("stack underflow at offset {}", self.pos))
    }

    fn pop_n(&mut self, n: usize) -> Step<()> {
        for _ in 0..n {
            self.pop()?;
        }
        Ok(())
    }

    /// Pops down to and including the topmost mark.
    fn pop_mark(&mut self) -> Step<()> {
        loop {
            if let Val::Mark = self.pop()? {
                return Ok(());
            }
        }
    }

    fn top(&self) -> Step<Val> {
        self.stack
            .last()
            .cloned()
            .ok_or_else(|| format!("empty stack at offset {}", self.pos))
    }

    fn record(&mut self, module: &str, name: &str, offset: usize) {
        // Python 2 names, as Python 3's unpickler maps them.
        let module = match module {
            "__builtin__" => "builtins",
            "copy_reg" => "copyreg",
            m => m,
        };
        let cut = |s: &str| {
            let c = clip(s);
            if c.len() < s.len() {
                format!("{c}...")
            } else {
                c.to_string()
            }
        };
        let (module, name) = (cut(module), cut(name));
        if self.seen.contains(&(module.clone(), name.clone())) {
            return;
        }
        if self.seen.len() >= MAX_GLOBALS {
            self.scan.more += 1;
            return;
        }
        self.seen.insert((module.clone(), name.clone()));
        self.scan.globals.push(GlobalRef {
            module,
            name,
            offset: offset as u64,
        });
    }

    fn text(b: &[u8]) -> Rc<str> {
        Rc::from(String::from_utf8_lossy(b).as_ref())
    }

    fn walk(&mut self) -> Step<()> {
        loop {
            let at = self.pos;
            let op = *self.take(1)?.first().expect("one byte");
            match op {
                b'.' => return Ok(()),
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME: the frame's opcodes follow inline
                }
                b'(' => self.stack.push(Val::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => self.pop_mark()?,
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                b'F' | b'I' | b'L' | b'P' => {
                    self.line()?;
                    self.stack.push(Val::Other);
                }
                b'J' => self.take_push(4)?,
                b'K' => self.take_push(1)?,
                b'M' => self.take_push(2)?,
                b'G' => self.take_push(8)?,
                b'N' | 0x88 | 0x89 | b'}' | b']' | b')' | 0x8f | 0x97 => self.stack.push(Val::Other),
                b'Q' | 0x85 | 0x98 => {
                    self.pop()?;
                    self.stack.push(Val::Other);
                }
                b'R' | 0x81 | 0x86 => {
                    self.pop_n(2)?;
                    self.stack.push(Val::Other);
                }
                0x87 | 0x92 => {
                    self.pop_n(3)?;
                    self.stack.push(Val::Other);
                }
                b'S' => {
                    let l = self.line()?;
                    let l = l.strip_prefix(b"'").and_then(|l| l.strip_suffix(b"'")).unwrap_or(l);
                    let l = l.strip_prefix(b"\"").and_then(|l| l.strip_suffix(b"\"")).unwrap_or(l);
                    self.stack.push(Val::Str(Self::text(l)));
                }
                b'V' => {
                    let l = self.line()?;
                    self.stack.push(Val::Str(Self::text(l)));
                }
                b'T' | b'X' => self.string(4)?,
                b'U' | 0x8c => self.string(1)?,
                0x8d => self.string(8)?,
                b'B' => self.bytes(4)?,
                b'C' | 0x8a => self.bytes(1)?,
                0x8b => self.bytes(4)?,
                0x8e | 0x96 => self.bytes(8)?,
                b'a' | b'b' => {
                    self.pop()?;
                }
                b's' => self.pop_n(2)?,
                b'e' | b'u' | 0x90 => self.pop_mark()?,
                b'd' | b'l' | b't' | 0x91 | b'o' => {
                    // OBJ: the class is the first item after the mark, pushed by a GLOBAL or
                    // STACK_GLOBAL already recorded.
                    self.pop_mark()?;
                    self.stack.push(Val::Other);
                }
                b'c' | b'i' => {
                    let module = Self::text(self.line()?);
                    let name = Self::text(self.line()?);
                    self.record(&module, &name, at);
                    if op == b'i' {
                        self.pop_mark()?;
                    }
                    self.stack.push(Val::Other);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Val::Str(m), Val::Str(n)) => self.record(&m, &n, at),
                        _ => self.record(UNKNOWN, UNKNOWN, at),
                    }
                    self.stack.push(Val::Other);
                }
                0x82..=0x84 => {
                    let code = self.uint(match op {
                        0x82 => 1,
                        0x83 => 2,
                        _ => 4,
                    })?;
                    self.record(EXTENSION, &code.to_string(), at);
                    self.stack.push(Val::Other);
                }
                b'g' => {
                    let idx = self.line_index()?;
                    self.get(idx)?;
                }
                b'h' => {
                    let idx = self.uint(1)?;
                    self.get(idx)?;
                }
                b'j' => {
                    let idx = self.uint(4)?;
                    self.get(idx)?;
                }
                b'p' => {
                    let idx = self.line_index()?;
                    self.put(idx)?;
                }
                b'q' => {
                    let idx = self.uint(1)?;
                    self.put(idx)?;
                }
                b'r' => {
                    let idx = self.uint(4)?;
                    self.put(idx)?;
                }
                0x94 => {
                    let idx = self.memo.len() as u64;
                    self.put(idx)?;
                }
                _ => return Err(format!("unknown opcode 0x{op:02x} at offset {at}")),
            }
        }
    }

    fn take_push(&mut self, n: u64) -> Step<()> {
        self.take(n)?;
        self.stack.push(Val::Other);
        Ok(())
    }

    fn string(&mut self, len_bytes: u64) -> Step<()> {
        let n = self.uint(len_bytes)?;
        let s = self.take(n)?;
        self.stack.push(Val::Str(Self::text(s)));
        Ok(())
    }

    fn bytes(&mut self, len_bytes: u64) -> Step<()> {
        let n = self.uint(len_bytes)?;
        self.take(n)?;
        self.stack.push(Val::Other);
        Ok(())
    }

    fn line_index(&mut self) -> Step<u64> {
        let l = self.line()?;
        std::str::from_utf8(l)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("bad memo index before offset {}", self.pos))
    }

    fn get(&mut self, idx: u64) -> Step<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("memo {idx} read before it is written (offset {})", self.pos))?;
        self.stack.push(v);
        Ok(())
    }

    fn put(&mut self, idx: u64) -> Step<()> {
        let v = self.top()?;
        if let Val::Mark = v {
            return Err(format!("memo {idx} of a mark (offset {})", self.pos));
        }
        self.memo.insert(idx, v);
        Ok(())
    }
}

/// The globals `data` (one pickle, up to its STOP) refers to.
pub fn scan(data: &[u8]) -> Scan {
    let mut w = Walker {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        seen: HashSet::new(),
        scan: Scan::default(),
    };
    if let Err(e) = w.walk() {
        w.scan.malformed = Some(e);
    }
    w.scan
}

/// torch's dtypes, as `torch.<name>` globals.
const DTYPES: &[&str] = &[
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "bcomplex32",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
];

/// torch layouts, memory formats and quantization schemes (objects, not callables that act).
const TORCH_CONSTANTS: &[&str] = &[
    "strided",
    "sparse_coo",
    "sparse_csr",
    "sparse_csc",
    "sparse_bsr",
    "sparse_bsc",
    "_mkldnn",
    "jagged",
    "contiguous_format",
    "channels_last",
    "channels_last_3d",
    "preserve_format",
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
];

/// Whether `module.name` is something torch's checkpoints legitimately name: DCP's metadata
/// classes, torch's tensor rebuild functions, storage and tensor classes, dtypes, `torch.Size`,
/// and the plain containers torch's `weights_only` unpickler also accepts (plus `frozenset`,
/// `slice`, `range` and `pathlib` paths, which build values and run nothing else).
pub fn is_allowed(module: &str, name: &str) -> bool {
    let torch_class = |suffix: &str| {
        name.strip_suffix(suffix).is_some_and(|p| {
            !p.is_empty() && p.starts_with(|c: char| c.is_ascii_uppercase()) && p.chars().all(|c| c.is_ascii_alphanumeric())
        })
    };
    match module {
        "torch.distributed.checkpoint.metadata" | "torch.distributed.checkpoint.planner" => true,
        "torch.distributed._shard.sharded_tensor.metadata" => {
            matches!(name, "TensorProperties" | "MEM_FORMAT_ENCODING")
        }
        "torch.distributed.checkpoint.filesystem" => name == "_StorageInfo",
        "torch._utils" => name.starts_with("_rebuild_"),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.serialization" => name == "_get_layout",
        "torch.nn.parameter" => name == "Parameter",
        "torch.storage" => matches!(name, "TypedStorage" | "UntypedStorage"),
        "torch" => {
            matches!(name, "Size" | "Tensor" | "device")
                || DTYPES.contains(&name)
                || TORCH_CONSTANTS.contains(&name)
                || torch_class("Storage")
                || torch_class("Tensor")
        }
        "torch.cuda" | "torch.sparse" | "torch.cuda.sparse" => torch_class("Storage") || torch_class("Tensor"),
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "_codecs" => name == "encode",
        "builtins" => matches!(name, "set" | "frozenset" | "bytearray" | "complex" | "slice" | "range" | "object"),
        // object.__new__(cls) for classes named (and checked) on their own.
        "copyreg" => name == "_reconstructor",
        "pathlib" => matches!(
            name,
            "Path" | "PosixPath" | "WindowsPath" | "PurePath" | "PurePosixPath" | "PureWindowsPath"
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &Scan) -> Vec<String> {
        s.globals.iter().map(GlobalRef::dotted).collect()
    }

    #[test]
    fn global_opcodes() {
        // Protocol 0: GLOBAL, REDUCE; INST.
        let p = b"cos\nsystem\n(S'echo hi'\ntR.";
        assert_eq!(names(&scan(p)), ["os.system"]);
        let p = b"(S'x'\nios\nsystem\n.";
        assert_eq!(names(&scan(p)), ["os.system"]);
        // Protocol 4: STACK_GLOBAL from two short strings, the module memoized and fetched again.
        let p = b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93h\x00\x8c\x04exec\x93.";
        let s = scan(p);
        assert_eq!(names(&s), ["builtins.eval", "builtins.exec"]);
        assert_eq!(s.malformed, None);
        assert_eq!(s.disallowed().count(), 2);
        // A STACK_GLOBAL of computed strings is unknown; EXT codes are named by code.
        let p = b"\x80\x04K\x01K\x02\x93\x82\x07.";
        assert_eq!(names(&scan(p)), [format!("{UNKNOWN}.{UNKNOWN}"), format!("{EXTENSION}.7")]);
        // Python 2 names are mapped as Python 3 does.
        assert_eq!(names(&scan(b"c__builtin__\nset\n.")), ["builtins.set"]);
        assert!(is_allowed("builtins", "set"));
    }

    #[test]
    fn malformed_and_bounded() {
        let s = scan(b"cos\nsystem\n\x80");
        assert_eq!(names(&s), ["os.system"]);
        assert!(s.malformed.unwrap().contains("truncated"));
        assert!(scan(b"0").malformed.unwrap().contains("underflow"));
        assert!(scan(b"\xff").malformed.unwrap().contains("unknown opcode"));
        assert!(scan(b"\x8e\xff\xff\xff\xff\xff\xff\xff\xff.").malformed.is_some());
        // 100k references to one memoized 1 MB string cost no copies.
        let mut p = b"\x80\x04\x8d".to_vec();
        p.extend_from_slice(&(1u64 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'a', 1 << 20));
        p.push(0x94);
        for _ in 0..100_000 {
            p.extend_from_slice(b"h\x000");
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        assert_eq!(scan(&p).malformed, None);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        // One memoized 1 MB module name, named by 100k STACK_GLOBALs: cut, never copied whole.
        let mut p = b"\x80\x04\x8d".to_vec();
        p.extend_from_slice(&(1u64 << 20).to_le_bytes());
        p.extend(std::iter::repeat_n(b'm', 1 << 20));
        p.push(0x94);
        for _ in 0..100_000 {
            p.extend_from_slice(b"h\x00\x8c\x01f\x930");
        }
        p.push(b'.');
        let t = std::time::Instant::now();
        let s = scan(&p);
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(s.globals.len(), 1);
        assert_eq!(s.globals[0].module.len(), MAX_NAME);
        assert!(s.globals[0].module.ends_with("...") && s.disallowed().count() == 1);
        // Many distinct globals: listed up to the cap, the rest counted.
        let mut p = Vec::new();
        for i in 0..MAX_GLOBALS + 5 {
            p.extend_from_slice(format!("cm\nf{i}\n0").as_bytes());
        }
        p.push(b'.');
        let s = scan(&p);
        assert_eq!((s.globals.len(), s.more), (MAX_GLOBALS, 5));
    }

    #[test]
    fn allowlist() {
        for (m, n) in [
            ("torch.distributed.checkpoint.metadata", "Metadata"),
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch._utils", "_rebuild_tensor_v2"),
            ("torch", "FloatStorage"),
            ("torch", "float32"),
            ("torch", "Size"),
            ("collections", "OrderedDict"),
            ("_codecs", "encode"),
        ] {
            assert!(is_allowed(m, n), "{m}.{n}");
        }
        for (m, n) in [
            ("os", "system"),
            ("builtins", "eval"),
            ("builtins", "getattr"),
            ("torch", "load"),
            ("torch", "Storage"),
            ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
            ("subprocess", "Popen"),
            ("torch._utils", "call"),
        ] {
            assert!(!is_allowed(m, n), "{m}.{n}");
        }
    }
}
