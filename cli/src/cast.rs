//! Element conversions for `convert --dtype` and `diff`: floating dtypes decoded exactly to
//! f32/f64, and f32 rounded to bf16/f16 to nearest even as torch does. torch converts f64 to
//! bf16/f16 through f32 (double rounding), and so does this.

use dcp::DType;

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((113 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return if man == 0 {
            sign | 0x7c00
        } else {
            sign | 0x7e00 | (man >> 13) as u16
        };
    }
    let e = exp - 112;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let full = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let mut h = full >> shift;
        let rem = full & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1; // a carry into the exponent is the right rounding (up to inf)
    }
    sign | h as u16
}

pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        // Quiet, with the sign and the top payload bits kept.
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn f8e4m3fn_to_f32(v: u8) -> f32 {
    let sign = if v & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((v >> 3) & 0xf) as i32;
    let man = (v & 7) as f32;
    if exp == 0xf && v & 7 == 7 {
        return f32::from_bits(if v & 0x80 != 0 { 0xffc0_0000 } else { 0x7fc0_0000 });
    }
    if exp == 0 {
        sign * man * (2f32).powi(-9)
    } else {
        sign * (1.0 + man / 8.0) * (2f32).powi(exp - 7)
    }
}

pub fn f8e5m2_to_f32(v: u8) -> f32 {
    f16_to_f32((v as u16) << 8)
}

/// One element of a real floating dtype, exactly, as f32 (f64 elements rounded to f32).
fn elem_f32(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
        DType::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
        DType::F16 => f16_to_f32(u16::from_le_bytes(b.try_into().unwrap())),
        DType::BF16 => bf16_to_f32(u16::from_le_bytes(b.try_into().unwrap())),
        DType::F8E4M3FN => f8e4m3fn_to_f32(b[0]),
        DType::F8E5M2 => f8e5m2_to_f32(b[0]),
        other => unreachable!("{other} is not a real floating dtype"),
    }
}

/// Converts the elements of a floating tensor to `to` (F32, F16 or BF16).
pub fn cast_float(from: DType, data: &[u8], to: DType) -> Vec<u8> {
    if from == to {
        return data.to_vec();
    }
    let n = data.len() / from.size();
    let mut out = Vec::with_capacity(n * to.size());
    for e in data.chunks_exact(from.size()) {
        let x = elem_f32(from, e);
        match to {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f32_to_f16(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&f32_to_bf16(x).to_le_bytes()),
            other => unreachable!("cast to {other}"),
        }
    }
    out
}

/// The components of one element as f64: one for real dtypes, two for complex ones.
pub fn components(dtype: DType, b: &[u8]) -> [f64; 2] {
    match dtype {
        DType::F64 => [f64::from_le_bytes(b.try_into().unwrap()), 0.0],
        DType::C64 => [
            f32::from_le_bytes(b[..4].try_into().unwrap()) as f64,
            f32::from_le_bytes(b[4..].try_into().unwrap()) as f64,
        ],
        DType::C128 => [
            f64::from_le_bytes(b[..8].try_into().unwrap()),
            f64::from_le_bytes(b[8..].try_into().unwrap()),
        ],
        d if d.is_floating_point() => [elem_f32(d, b) as f64, 0.0],
        _ => unreachable!("not a floating dtype"),
    }
}

/// An integer (or bool) element, widened.
pub fn int_value(dtype: DType, b: &[u8]) -> i128 {
    match dtype {
        DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::I16 => i16::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::I8 => b[0] as i8 as i128,
        DType::U8 | DType::Bool => b[0] as i128,
        DType::U16 => u16::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i128,
        DType::U64 => u64::from_le_bytes(b.try_into().unwrap()) as i128,
        _ => unreachable!("not an integer dtype"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_all_values_roundtrip() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:04x} {x}");
            }
        }
    }

    #[test]
    fn f16_rounding() {
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds up to inf
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie to even (down)
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02); // tie to even (up)
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0); // half of the smallest subnormal: even
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.5), 1);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
    }

    #[test]
    fn bf16_rounding() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd -> up
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert!(bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan());
        for h in 0..=u16::MAX {
            let x = bf16_to_f32(h);
            if !x.is_nan() {
                assert_eq!(f32_to_bf16(x), h);
            }
        }
    }

    #[test]
    fn f8() {
        assert_eq!(f8e4m3fn_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3fn_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3fn_to_f32(0x01), 2f32.powi(-9));
        assert!(f8e4m3fn_to_f32(0x7f).is_nan());
        assert_eq!(f8e4m3fn_to_f32(0xb8), -1.0);
        assert_eq!(f8e5m2_to_f32(0x3c), 1.0);
        assert_eq!(f8e5m2_to_f32(0x7b), 57344.0);
        assert!(f8e5m2_to_f32(0x7c).is_infinite());
    }
}
