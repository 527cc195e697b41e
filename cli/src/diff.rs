//! `dcp diff A B`: keys only in one checkpoint, kind/dtype/shape changes, and for common keys
//! whether the values are equal (floating dtypes: the largest absolute difference). One key at a
//! time, in pieces of at most 64 MiB of each side: a tensor's claimed size is checked against the
//! bytes its items hold before anything is read.

use crate::cast::{components, int_value};
use crate::error::{CliError, CliResult};
use crate::progress::Progress;
use crate::stream::{piece_bytes, Pieces, TensorStream};
use dcp::{Checkpoint, DType, KeyInfo, KeyKind, ObjectValue};
use std::collections::HashMap;

pub const HELP: &str = "\
usage: dcp diff A B

Compares the checkpoints in directories A and B key by key: keys only in A or only in B,
changes of kind, dtype or global shape, and for common keys whether the values are equal
(however each side is chunked). For floating dtypes (float64/32/16, bfloat16, float8, complex)
the largest absolute difference is shown, decoded to float64; for integers the largest
difference. Exit status: 0 when A and B hold the same keys with identical values, 1 otherwise.

options:
  -h, --help  show this help";

fn describe(v: &ObjectValue) -> String {
    let s = match v {
        ObjectValue::Pickle(p) => format!("<pickled object, {} bytes>", p.len()),
        v => v.literal().unwrap_or_default(),
    };
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

/// Plain notation for ordinary magnitudes, scientific for very small or large ones.
fn float_str(x: f64) -> String {
    if x == 0.0 || (1e-4..1e6).contains(&x.abs()) {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// How two equally shaped tensors of one dtype differ, accumulated piece by piece.
struct Comparison {
    dtype: DType,
    total: u64,
    differ: u64,
    max_f: f64,
    nan_mismatch: u64,
    max_i: i128,
}

impl Comparison {
    fn new(dtype: DType) -> Self {
        Comparison {
            dtype,
            total: 0,
            differ: 0,
            max_f: 0.0,
            nan_mismatch: 0,
            max_i: 0,
        }
    }

    fn is_float(&self) -> bool {
        self.dtype.is_floating_point() || matches!(self.dtype, DType::C64 | DType::C128)
    }

    /// Two pieces at the same place of the two tensors.
    fn add(&mut self, a: &[u8], b: &[u8]) {
        let n = self.dtype.size();
        self.total += (a.len() / n) as u64;
        if a == b {
            return;
        }
        for (x, y) in a.chunks_exact(n).zip(b.chunks_exact(n)) {
            if x == y {
                continue;
            }
            self.differ += 1;
            if self.is_float() {
                let (p, q) = (components(self.dtype, x), components(self.dtype, y));
                for k in 0..2 {
                    let (u, v) = (p[k], q[k]);
                    if (u.is_nan() && v.is_nan()) || u == v {
                        continue;
                    }
                    let d = (u - v).abs();
                    if d.is_nan() {
                        self.nan_mismatch += 1;
                    } else if d > self.max_f {
                        self.max_f = d;
                    }
                }
            } else {
                self.max_i = self.max_i.max((int_value(self.dtype, x) - int_value(self.dtype, y)).abs());
            }
        }
    }

    /// `None` when equal.
    fn summary(&self) -> Option<String> {
        if self.differ == 0 {
            return None;
        }
        let what = format!("{} of {} elements differ", self.differ, self.total);
        Some(if self.is_float() {
            let nan = if self.nan_mismatch > 0 {
                format!(" ({} NaN in one only)", self.nan_mismatch)
            } else {
                String::new()
            };
            format!("{what}, max abs diff {}{nan}", float_str(self.max_f))
        } else if self.dtype == DType::Bool {
            what
        } else {
            format!("{what}, max abs diff {}", self.max_i)
        })
    }
}

#[cfg(test)]
fn compare_values(dtype: DType, a: &[u8], b: &[u8]) -> String {
    let mut c = Comparison::new(dtype);
    c.add(a, b);
    c.summary().unwrap_or_default()
}

/// Compares tensor `fqn` of A and B (same dtype and shape) piece by piece: at most one piece of
/// each side in memory, every size checked against the stored bytes first.
fn compare_tensor(
    ca: &Checkpoint,
    cb: &Checkpoint,
    fqn: &str,
    lens: &mut (HashMap<String, u64>, HashMap<String, u64>),
    on_piece: &mut dyn FnMut(u64),
) -> Result<Option<String>, String> {
    let (ka, kb) = (ca.find(fqn).expect("key of A"), cb.find(fqn).expect("key of B"));
    let sa = TensorStream::open(ca, &ka, &mut lens.0).map_err(|e| format!("{e} (in A)"))?;
    let sb = TensorStream::open(cb, &kb, &mut lens.1).map_err(|e| format!("{e} (in B)"))?;
    let mut cmp = Comparison::new(sa.dtype);
    let (mut buf_a, mut buf_b) = (Vec::new(), Vec::new());
    // The same boxes of both sides, so the same bytes.
    for (offsets, sizes) in Pieces::new(sa.shape, sa.dtype.size() as u64, piece_bytes()) {
        sa.read_piece(&offsets, &sizes, &mut buf_a).map_err(|e| format!("{e} (in A)"))?;
        sb.read_piece(&offsets, &sizes, &mut buf_b).map_err(|e| format!("{e} (in B)"))?;
        cmp.add(&buf_a, &buf_b);
        on_piece(2 * buf_a.len() as u64);
    }
    Ok(cmp.summary())
}

fn cannot_compare(fqn: &str, e: &str) -> String {
    if e.contains(&format!("{fqn:?}")) {
        format!("cannot compare: {e}")
    } else {
        format!("cannot compare: key {fqn:?}: {e}")
    }
}

fn tensor_bytes(k: &KeyInfo) -> u64 {
    k.nbytes().unwrap_or(0).min(u64::MAX / 4)
}

/// The command line of `dcp diff` (see [`HELP`]).
#[derive(clap::Args)]
pub struct Args {
    #[arg(value_name = "DIR")]
    pub dirs: Vec<String>,
}

pub fn run(args: Args) -> CliResult {
    let [a, b] = args.dirs.as_slice() else {
        return Err(CliError::usage("diff", "expects two checkpoint directories A and B"));
    };
    let fail = |e: dcp::Error| CliError::fail("diff", e);
    let ca = Checkpoint::open(a).map_err(fail)?;
    let cb = Checkpoint::open(b).map_err(fail)?;
    let total: u64 = ca
        .keys()
        .filter_map(|k| cb.find(k.fqn).map(|kb| (k, kb)))
        .filter(|(k, kb)| k.kind == KeyKind::Tensor && kb.kind == KeyKind::Tensor && k.dtype_name == kb.dtype_name && k.shape == kb.shape)
        .map(|(k, kb)| tensor_bytes(&k) + tensor_bytes(&kb))
        .sum();
    let mut bar = Progress::new("diff", total);
    let mut done = 0u64;
    let mut lens = (HashMap::new(), HashMap::new());
    let (mut only_a, mut only_b, mut changed, mut equal) = (0, 0, 0, 0);
    for ka in ca.keys() {
        let fqn = ka.fqn;
        let Some(kb) = cb.find(fqn) else {
            bar.println(&format!("only in A: {fqn}"));
            only_a += 1;
            continue;
        };
        let line = match (ka.kind, kb.kind) {
            (KeyKind::Tensor, KeyKind::Tensor) => {
                let mut what = Vec::new();
                if ka.dtype_name != kb.dtype_name {
                    what.push(format!("dtype {} (A) vs {} (B)", ka.dtype_name, kb.dtype_name));
                }
                if ka.shape != kb.shape {
                    what.push(format!("shape {:?} (A) vs {:?} (B)", ka.shape, kb.shape));
                }
                if !what.is_empty() {
                    Some(format!("differs: {fqn}: {}", what.join(", ")))
                } else {
                    // A key that cannot be read (damaged, unknown dtype, a size its items do
                    // not hold) is reported and the comparison goes on.
                    let start = done;
                    done += tensor_bytes(&ka) + tensor_bytes(&kb);
                    let mut at = start;
                    let r = compare_tensor(&ca, &cb, fqn, &mut lens, &mut |n| {
                        at += n;
                        bar.update(at);
                    });
                    bar.update(done);
                    match r {
                        Ok(d) => d.map(|d| format!("differs: {fqn}: {d}")),
                        Err(e) => Some(cannot_compare(fqn, &e)),
                    }
                }
            }
            (KeyKind::Object, KeyKind::Object) => match ca.read_object(fqn).and_then(|a| Ok((a, cb.read_object(fqn)?))) {
                Ok((va, vb)) => (va != vb).then(|| format!("differs: {fqn}: object {} (A) vs {} (B)", describe(&va), describe(&vb))),
                Err(e) => Some(cannot_compare(fqn, &e.to_string())),
            },
            (x, y) => {
                let name = |k: KeyKind| if k == KeyKind::Tensor { "tensor" } else { "object" };
                Some(format!("differs: {fqn}: {} (A) vs {} (B)", name(x), name(y)))
            }
        };
        match line {
            Some(l) => {
                bar.println(&l);
                changed += 1;
            }
            None => equal += 1,
        }
    }
    for kb in cb.keys() {
        if ca.find(kb.fqn).is_none() {
            bar.println(&format!("only in B: {}", kb.fqn));
            only_b += 1;
        }
    }
    bar.clear();
    if only_a + only_b + changed == 0 {
        println!("identical: {equal} keys");
        Ok(())
    } else {
        println!("{equal} equal, {changed} differ, {only_a} only in A, {only_b} only in B");
        Err(CliError {
            code: 1,
            message: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_comparison() {
        let a: Vec<u8> = [1.0f32, 2.0, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [1.0f32, 2.5, f32::NAN].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(compare_values(DType::F32, &a, &b), "1 of 3 elements differ, max abs diff 0.5");
        let a: Vec<u8> = [5i64, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [5i64, 4].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(compare_values(DType::I64, &a, &b), "1 of 2 elements differ, max abs diff 7");
    }
}
