//! Planning: which rank writes which chunk (save), and which stored bytes each registered box
//! needs (load).

pub mod load;
pub mod runs;
pub mod save;

/// FNV-1a, 64 bit: a hash that is the same on every rank, build and platform.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
