//! `dcp diff A B`: keys only in one checkpoint, kind/dtype/shape changes, and for common keys
//! whether the values are equal (floating dtypes: the largest absolute difference). One key at a
//! time: at most one tensor of each checkpoint is in memory.

use crate::args::{CliError, CliResult};
use crate::cast::{components, int_value};
use crate::progress::Progress;
use dcp::{Checkpoint, DType, KeyInfo, KeyKind, ObjectValue};

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

/// How two equally shaped tensors of one dtype differ.
fn compare_values(dtype: DType, a: &[u8], b: &[u8]) -> String {
    let n = dtype.size();
    let total = a.len() / n;
    let mut differ = 0u64;
    let mut max_f = 0f64;
    let mut nan_mismatch = 0u64;
    let mut max_i = 0i128;
    for (x, y) in a.chunks_exact(n).zip(b.chunks_exact(n)) {
        if x == y {
            continue;
        }
        differ += 1;
        if dtype.is_floating_point() || matches!(dtype, DType::C64 | DType::C128) {
            let (p, q) = (components(dtype, x), components(dtype, y));
            for k in 0..2 {
                let (u, v) = (p[k], q[k]);
                if (u.is_nan() && v.is_nan()) || u == v {
                    continue;
                }
                let d = (u - v).abs();
                if d.is_nan() {
                    nan_mismatch += 1;
                } else if d > max_f {
                    max_f = d;
                }
            }
        } else {
            max_i = max_i.max((int_value(dtype, x) - int_value(dtype, y)).abs());
        }
    }
    let what = format!("{differ} of {total} elements differ");
    if dtype.is_floating_point() || matches!(dtype, DType::C64 | DType::C128) {
        let nan = if nan_mismatch > 0 {
            format!(" ({nan_mismatch} NaN in one only)")
        } else {
            String::new()
        };
        format!("{what}, max abs diff {}{nan}", float_str(max_f))
    } else if dtype == DType::Bool {
        what
    } else {
        format!("{what}, max abs diff {max_i}")
    }
}

fn cannot_compare(fqn: &str, e: &dcp::Error) -> String {
    if e.message().contains(&format!("{fqn:?}")) {
        format!("cannot compare: {e}")
    } else {
        format!("cannot compare: key {fqn:?}: {e}")
    }
}

fn tensor_bytes(k: &KeyInfo) -> u64 {
    k.nbytes().unwrap_or(0)
}

pub fn run(args: crate::args::Args) -> CliResult {
    let [a, b] = args.positional.as_slice() else {
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
                    // A key that cannot be read (damaged, unknown dtype) is reported and the
                    // comparison goes on.
                    done += tensor_bytes(&ka) + tensor_bytes(&kb);
                    match ca.read_tensor(fqn).and_then(|a| Ok((a, cb.read_tensor(fqn)?))) {
                        Ok(((da, _, va), (_, _, vb))) => {
                            bar.update(done);
                            (va != vb).then(|| format!("differs: {fqn}: {}", compare_values(da, &va, &vb)))
                        }
                        Err(e) => Some(cannot_compare(fqn, &e)),
                    }
                }
            }
            (KeyKind::Object, KeyKind::Object) => match ca.read_object(fqn).and_then(|a| Ok((a, cb.read_object(fqn)?))) {
                Ok((va, vb)) => (va != vb).then(|| format!("differs: {fqn}: object {} (A) vs {} (B)", describe(&va), describe(&vb))),
                Err(e) => Some(cannot_compare(fqn, &e)),
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
