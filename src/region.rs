//! n-dimensional boxes of a global tensor: where a chunk sits (offsets) and how large it is.

use crate::error::{ensure, Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
/// A box of a global tensor: where it starts in each dim and how large it is.
pub struct Region {
    /// Start in each dim.
    pub offsets: Vec<u64>,
    /// Size in each dim.
    pub sizes: Vec<u64>,
}

impl Region {
    /// A box at `offsets` of `sizes`, which must have the same length.
    pub fn new(offsets: Vec<u64>, sizes: Vec<u64>) -> Result<Self> {
        ensure!(
            offsets.len() == sizes.len(),
            Error::invalid(format!("offsets {offsets:?} and sizes {sizes:?} have different ranks"))
        );
        Ok(Region { offsets, sizes })
    }

    /// The whole tensor of the given shape.
    pub fn full(shape: &[u64]) -> Self {
        Region {
            offsets: vec![0; shape.len()],
            sizes: shape.to_vec(),
        }
    }

    /// Number of dims.
    pub fn ndim(&self) -> usize {
        self.sizes.len()
    }

    /// Number of elements in the box.
    pub fn numel(&self) -> u64 {
        self.sizes.iter().product()
    }

    /// Whether the box has no elements.
    pub fn is_empty(&self) -> bool {
        self.sizes.contains(&0)
    }

    /// Checks the box lies inside a tensor of `shape`.
    pub fn check_within(&self, shape: &[u64]) -> Result<()> {
        ensure!(
            self.offsets.len() == self.sizes.len(),
            Error::invalid(format!("box with {} offsets and {} sizes", self.offsets.len(), self.sizes.len()))
        );
        ensure!(
            self.ndim() == shape.len(),
            Error::invalid(format!("box of rank {} for a tensor of rank {}", self.ndim(), shape.len()))
        );
        for d in 0..shape.len() {
            let end = self.offsets[d].checked_add(self.sizes[d]);
            ensure!(
                end.is_some_and(|e| e <= shape[d]),
                Error::invalid(format!(
                    "box at offsets {:?} with sizes {:?} exceeds the global shape {:?} in dim {d}",
                    self.offsets, self.sizes, shape
                ))
            );
        }
        Ok(())
    }

    /// The overlap of two boxes, or `None` if they do not overlap (or it is empty).
    pub fn intersect(&self, other: &Region) -> Option<Region> {
        if self.ndim() != other.ndim() {
            return None;
        }
        let mut offsets = Vec::with_capacity(self.ndim());
        let mut sizes = Vec::with_capacity(self.ndim());
        for d in 0..self.ndim() {
            let lo = self.offsets[d].max(other.offsets[d]);
            let hi = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
            if hi <= lo {
                return None;
            }
            offsets.push(lo);
            sizes.push(hi - lo);
        }
        Some(Region { offsets, sizes })
    }

    /// Whether the two boxes share an element (what `intersect(..).is_some()` says, without
    /// building the overlap).
    pub fn overlaps(&self, other: &Region) -> bool {
        self.ndim() == other.ndim()
            && (0..self.ndim()).all(|d| {
                let lo = self.offsets[d].max(other.offsets[d]);
                let hi = (self.offsets[d] + self.sizes[d]).min(other.offsets[d] + other.sizes[d]);
                lo < hi
            })
    }

    /// Whether `other` (of this rank) lies inside this box.
    pub fn contains(&self, other: &Region) -> bool {
        self.ndim() == other.ndim()
            && (0..self.ndim()).all(|d| {
                other.offsets[d] >= self.offsets[d]
                    && other.offsets[d]
                        .checked_add(other.sizes[d])
                        .is_some_and(|e| e <= self.offsets[d].saturating_add(self.sizes[d]))
            })
    }

    /// Whether the index `p` (of this rank) lies in this box.
    pub fn contains_point(&self, p: &[u64]) -> bool {
        p.len() == self.ndim() && (0..self.ndim()).all(|d| p[d] >= self.offsets[d] && p[d] - self.offsets[d] < self.sizes[d])
    }

    /// The same box expressed relative to the origin of `outer` (which must contain it).
    pub fn relative_to(&self, outer: &Region) -> Vec<u64> {
        self.offsets.iter().zip(&outer.offsets).map(|(a, b)| a - b).collect()
    }
}

/// Most signed corner records [`tiling_defect`] builds (boxes x 2^dims split): 8 Mi records of a
/// few dims cost well under a second and under 200 MiB.
pub const MAX_CORNERS: u64 = 1 << 23;

/// Why boxes fail to tile their outer box: a point two boxes share, or a point none covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TilingDefect {
    /// Boxes `a < b` both contain the index `at`.
    Overlap { a: usize, b: usize, at: Vec<u64> },
    /// No box contains the index `at`.
    Gap { at: Vec<u64> },
}

/// Whether `boxes` (each of the rank of `outer` and inside it) cover every element of `outer`
/// exactly once; if not, one point where they do not, with the boxes that share it.
///
/// Signed corner counting, O(n 2^k (k + log n)) for n boxes that split k dims (dims every box
/// spans whole are set aside), whatever the boxes. The coverage count of a point x is
/// m(x) = sum over boxes B of prod_d [lo_d <= x_d < hi_d]; expanding each factor as
/// [x_d >= lo_d] - [x_d >= hi_d] writes m as a sum of orthant indicators [x >= c] over the 2^k
/// corners c of every box, signed (-1)^(number of hi coordinates in c). The same holds for the
/// outer box, so g = m - [x in outer] = sum_c w_c [x >= c] with w_c the net signed count of corner
/// c (outer corners negated). The boxes tile `outer` exactly when g = 0, which holds exactly when
/// every w_c = 0: the mixed backward difference of g at any point y is w_y. So a sort of the
/// corners decides it; a corner y with w_y != 0 has some point y - e (e in {0,1}^k) with
/// g != 0, found by counting the boxes that hold each of those 2^k points.
pub fn tiling_defect(outer: &Region, boxes: &[&Region]) -> Result<Option<TilingDefect>> {
    tiling_defect_packing(outer, boxes, 128)
}

/// [`tiling_defect`], packing corners into integers when they take at most `max_bits`.
fn tiling_defect_packing(outer: &Region, boxes: &[&Region], max_bits: u32) -> Result<Option<TilingDefect>> {
    let ndim = outer.ndim();
    for b in boxes {
        ensure!(
            b.ndim() == ndim && outer.contains(b),
            Error::invalid(format!(
                "box at offsets {:?} sizes {:?} is not inside the box at offsets {:?} sizes {:?}",
                b.offsets, b.sizes, outer.offsets, outer.sizes
            ))
        );
    }
    if outer.is_empty() {
        return Ok(None);
    }
    let live: Vec<usize> = (0..boxes.len()).filter(|&i| !boxes[i].is_empty()).collect();
    // Dims some box does not span whole; the others factor out of m and of the outer box alike.
    let split: Vec<usize> = (0..ndim)
        .filter(|&d| {
            live.iter()
                .any(|&i| boxes[i].offsets[d] != outer.offsets[d] || boxes[i].sizes[d] != outer.sizes[d])
        })
        .collect();
    let k = split.len();
    let per_box = 1u64.checked_shl(k as u32).unwrap_or(u64::MAX);
    let records = per_box.saturating_mul(live.len() as u64 + 1);
    ensure!(
        k < 64 && records <= MAX_CORNERS,
        Error::unsupported(format!(
            "{} boxes split {k} dims: checking that they tile the box at offsets {:?} sizes {:?} would take {records} corner records (at most {MAX_CORNERS})",
            live.len(),
            outer.offsets,
            outer.sizes
        ))
    );
    // Coordinates compressed per split dim, so a corner is k small integers.
    let axes: Vec<Vec<u64>> = split
        .iter()
        .map(|&d| {
            let mut v = vec![outer.offsets[d], outer.offsets[d].saturating_add(outer.sizes[d])];
            for &i in &live {
                v.push(boxes[i].offsets[d]);
                v.push(boxes[i].offsets[d] + boxes[i].sizes[d]);
            }
            v.sort_unstable();
            v.dedup();
            v
        })
        .collect();
    let rank = |j: usize, x: u64| axes[j].binary_search(&x).expect("every boundary is on its axis") as u32;
    let mut coords: Vec<u32> = Vec::with_capacity(records as usize * k);
    let mut signs: Vec<i8> = Vec::with_capacity(records as usize);
    let mut push_corners = |b: &Region, sign: i8| {
        for mask in 0..per_box {
            let mut s = sign;
            for (j, &d) in split.iter().enumerate() {
                let hi = mask >> j & 1 == 1;
                let x = if hi {
                    b.offsets[d].saturating_add(b.sizes[d])
                } else {
                    b.offsets[d]
                };
                if hi {
                    s = -s;
                }
                coords.push(rank(j, x));
            }
            signs.push(s);
        }
    };
    push_corners(outer, -1);
    for &i in &live {
        push_corners(boxes[i], 1);
    }
    let corner = |r: usize| &coords[r * k..(r + 1) * k];
    let bits: Vec<u32> = axes.iter().map(|a| u32::BITS - (a.len() as u32).leading_zeros()).collect();
    let defect = if bits.iter().sum::<u32>() <= max_bits {
        // Corners packed into one integer each (the usual case: a few dims): a plain sort.
        let mut keys: Vec<(u128, u32)> = (0..signs.len())
            .map(|r| {
                (
                    corner(r).iter().zip(&bits).fold(0u128, |acc, (&c, &b)| acc << b | c as u128),
                    r as u32,
                )
            })
            .collect();
        keys.sort_unstable();
        first_nonzero(keys.len(), |a, b| keys[a].0 == keys[b].0, |a| signs[keys[a].1 as usize]).map(|g| keys[g].1 as usize)
    } else {
        let mut order: Vec<u32> = (0..signs.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| corner(a as usize).cmp(corner(b as usize)));
        first_nonzero(
            order.len(),
            |a, b| corner(order[a] as usize) == corner(order[b] as usize),
            |a| signs[order[a] as usize],
        )
        .map(|g| order[g] as usize)
    };
    let Some(r) = defect else { return Ok(None) };
    // The points y - e around the defect corner y; dims not split take the outer box's start.
    let y: Vec<u64> = corner(r).iter().enumerate().map(|(j, &c)| axes[j][c as usize]).collect();
    for mask in 0..per_box {
        let mut p = outer.offsets.clone();
        let mut inside = true;
        for (j, &d) in split.iter().enumerate() {
            let x = if mask >> j & 1 == 1 { y[j].checked_sub(1) } else { Some(y[j]) };
            match x.filter(|&x| x >= outer.offsets[d] && x < outer.offsets[d].saturating_add(outer.sizes[d])) {
                Some(x) => p[d] = x,
                None => inside = false,
            }
        }
        if !inside {
            continue;
        }
        let mut holders = live.iter().copied().filter(|&i| boxes[i].contains_point(&p));
        match (holders.next(), holders.next()) {
            (None, _) => return Ok(Some(TilingDefect::Gap { at: p })),
            (Some(a), Some(b)) => return Ok(Some(TilingDefect::Overlap { a, b, at: p })),
            (Some(_), None) => {}
        }
    }
    Err(Error::internal(format!(
        "tiling check: corner {y:?} has a nonzero count but no point around it is covered other than once"
    )))
}

/// In a sorted list of `n` signed records, the first position of a group of equal records whose
/// signs do not cancel.
fn first_nonzero(n: usize, same: impl Fn(usize, usize) -> bool, sign: impl Fn(usize) -> i8) -> Option<usize> {
    let mut g = 0;
    while g < n {
        let mut h = g;
        let mut net = 0i64;
        while h < n && same(g, h) {
            net += sign(h) as i64;
            h += 1;
        }
        if net != 0 {
            return Some(g);
        }
        g = h;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersect_boxes() {
        let a = Region::new(vec![0, 0], vec![4, 4]).unwrap();
        let b = Region::new(vec![2, 3], vec![4, 4]).unwrap();
        assert_eq!(
            a.intersect(&b),
            Some(Region {
                offsets: vec![2, 3],
                sizes: vec![2, 1]
            })
        );
        let c = Region::new(vec![4, 0], vec![1, 1]).unwrap();
        assert_eq!(a.intersect(&c), None);
        let scalar = Region::full(&[]);
        assert_eq!(scalar.intersect(&scalar), Some(scalar.clone()));
        assert_eq!(scalar.numel(), 1);
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c), (&scalar, &scalar)] {
            assert_eq!(x.overlaps(y), x.intersect(y).is_some());
        }
    }

    fn naive(outer: &Region, boxes: &[&Region]) -> bool {
        let live: Vec<&&Region> = boxes.iter().filter(|b| !b.is_empty()).collect();
        let disjoint = (0..live.len()).all(|i| (i + 1..live.len()).all(|j| !live[i].overlaps(live[j])));
        disjoint && live.iter().map(|b| b.numel()).sum::<u64>() == outer.numel()
    }

    fn check_defect(outer: &Region, boxes: &[&Region], d: &TilingDefect) {
        match d {
            TilingDefect::Gap { at } => {
                assert!(outer.contains_point(at) && !boxes.iter().any(|b| b.contains_point(at)), "{d:?}")
            }
            TilingDefect::Overlap { a, b, at } => {
                assert!(a < b && boxes[*a].contains_point(at) && boxes[*b].contains_point(at), "{d:?}")
            }
        }
    }

    /// xorshift64*: reproducible random boxes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
        }
    }

    /// A random grid tiling of `shape`, some cells merged along dim 0.
    fn grid(rng: &mut Rng, shape: &[u64]) -> Vec<Region> {
        let cuts: Vec<Vec<u64>> = shape
            .iter()
            .map(|&s| {
                let mut c: Vec<u64> = (0..rng.below(3)).map(|_| rng.below(s + 1)).collect();
                c.extend([0, s]);
                c.sort_unstable();
                c.dedup();
                c
            })
            .collect();
        let mut out = vec![Region::full(&[])];
        for c in &cuts {
            let mut next = Vec::new();
            for b in &out {
                for w in c.windows(2) {
                    let mut r = b.clone();
                    r.offsets.push(w[0]);
                    r.sizes.push(w[1] - w[0]);
                    next.push(r);
                }
            }
            out = next;
        }
        out
    }

    #[test]
    fn tiling_matches_naive_check_on_random_boxes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut tilings, mut defects) = (0, 0);
        for _ in 0..20_000 {
            let ndim = rng.below(4) as usize;
            let shape: Vec<u64> = (0..ndim).map(|_| 1 + rng.below(5)).collect();
            let outer = Region::full(&shape);
            let mut boxes = match rng.below(3) {
                // Random boxes: mostly overlaps and gaps.
                0 => (0..rng.below(6))
                    .map(|_| {
                        let o: Vec<u64> = shape.iter().map(|&s| rng.below(s + 1)).collect();
                        let z: Vec<u64> = shape.iter().zip(&o).map(|(&s, &o)| rng.below(s - o + 1)).collect();
                        Region::new(o, z).unwrap()
                    })
                    .collect(),
                // A tiling, perhaps with a box dropped, duplicated or moved.
                _ => grid(&mut rng, &shape),
            };
            match rng.below(4) {
                0 if !boxes.is_empty() => {
                    let i = rng.below(boxes.len() as u64) as usize;
                    boxes.remove(i);
                }
                1 if !boxes.is_empty() => {
                    let i = rng.below(boxes.len() as u64) as usize;
                    boxes.push(boxes[i].clone());
                }
                2 if !boxes.is_empty() && ndim > 0 => {
                    let i = rng.below(boxes.len() as u64) as usize;
                    let d = rng.below(ndim as u64) as usize;
                    let b = &mut boxes[i];
                    b.offsets[d] = rng.below(shape[d] - b.sizes[d] + 1);
                }
                _ => {}
            }
            let refs: Vec<&Region> = boxes.iter().collect();
            let got = tiling_defect(&outer, &refs).unwrap();
            assert_eq!(got.is_none(), naive(&outer, &refs), "shape {shape:?} boxes {boxes:?}: {got:?}");
            // The unpacked path (corners of many dims) answers the same.
            assert_eq!(
                tiling_defect_packing(&outer, &refs, 0).unwrap(),
                got,
                "shape {shape:?} boxes {boxes:?}"
            );
            match got {
                None => tilings += 1,
                Some(d) => {
                    defects += 1;
                    check_defect(&outer, &refs, &d);
                }
            }
        }
        assert!(tilings > 3000 && defects > 3000, "{tilings} tilings, {defects} defects");
    }

    #[test]
    fn tiling_of_a_sub_box_and_edge_cases() {
        let r = |o: &[u64], s: &[u64]| Region::new(o.to_vec(), s.to_vec()).unwrap();
        let outer = r(&[2, 3], &[4, 4]);
        let (a, b) = (r(&[2, 3], &[2, 4]), r(&[4, 3], &[2, 4]));
        assert_eq!(tiling_defect(&outer, &[&a, &b]).unwrap(), None);
        assert_eq!(tiling_defect(&outer, &[&a]).unwrap(), Some(TilingDefect::Gap { at: vec![4, 3] }));
        assert_eq!(
            tiling_defect(&outer, &[&a, &b, &a]).unwrap(),
            Some(TilingDefect::Overlap {
                a: 0,
                b: 2,
                at: vec![2, 3]
            })
        );
        assert!(tiling_defect(&outer, &[&r(&[0, 0], &[1, 1])]).is_err());
        let scalar = Region::full(&[]);
        assert_eq!(tiling_defect(&scalar, &[&scalar]).unwrap(), None);
        assert_eq!(tiling_defect(&scalar, &[]).unwrap(), Some(TilingDefect::Gap { at: vec![] }));
        assert!(matches!(
            tiling_defect(&scalar, &[&scalar, &scalar]).unwrap(),
            Some(TilingDefect::Overlap { a: 0, b: 1, .. })
        ));
        // An empty outer box is tiled by its empty boxes.
        assert_eq!(tiling_defect(&r(&[0, 0], &[0, 3]), &[&r(&[0, 0], &[0, 3])]).unwrap(), None);
        // Too many split dims is refused, not attempted.
        let shape = vec![2u64; 30];
        let halves: Vec<Region> = (0..2).map(|h| Region::new(vec![h; 30], vec![1; 30]).unwrap()).collect();
        let refs: Vec<&Region> = halves.iter().collect();
        assert!(tiling_defect(&Region::full(&shape), &refs).is_err());
    }

    /// A `.metadata`-scale tensor: 200k chunks in a 500 x 400 grid, then one moved onto its
    /// neighbour. Both answers in well under a second (release).
    #[test]
    fn tiling_of_200k_chunks_is_fast() {
        let (rows, cols) = (500u64, 400u64);
        let shape = [rows * 8, cols * 16];
        let mut chunks: Vec<Region> = (0..rows * cols)
            .map(|i| Region::new(vec![(i / cols) * 8, (i % cols) * 16], vec![8, 16]).unwrap())
            .collect();
        let outer = Region::full(&shape);
        let t = std::time::Instant::now();
        assert_eq!(tiling_defect(&outer, &chunks.iter().collect::<Vec<_>>()).unwrap(), None);
        let valid = t.elapsed();
        chunks[77_777].offsets[1] += 16;
        let t = std::time::Instant::now();
        let d = tiling_defect(&outer, &chunks.iter().collect::<Vec<_>>()).unwrap();
        let bad = t.elapsed();
        assert!(
            matches!(
                d,
                Some(TilingDefect::Overlap { a: 77_777, b: 77_778, .. }) | Some(TilingDefect::Gap { .. })
            ),
            "{d:?}"
        );
        // Long boxes all meeting in one dim (the worst case of a sweep) cost the same.
        let long: Vec<Region> = (0..200_000u64)
            .map(|i| Region::new(vec![i, 0], vec![1, 1 << 20]).unwrap())
            .collect();
        let mut long_bad = long.clone();
        long_bad.push(Region::new(vec![0, 0], vec![200_000, 1]).unwrap());
        let outer = Region::full(&[200_000, 1 << 20]);
        let t = std::time::Instant::now();
        assert_eq!(tiling_defect(&outer, &long.iter().collect::<Vec<_>>()).unwrap(), None);
        assert!(tiling_defect(&outer, &long_bad.iter().collect::<Vec<_>>()).unwrap().is_some());
        let sweep = t.elapsed();
        eprintln!("200k chunks: valid tiling {valid:?}, one moved {bad:?}; 200k long boxes, valid and not: {sweep:?}");
        if !cfg!(debug_assertions) {
            let limit = std::time::Duration::from_millis(500);
            assert!(valid < limit && bad < limit && sweep < limit * 2, "{valid:?} {bad:?} {sweep:?}");
        }
    }

    #[test]
    fn within() {
        let a = Region::new(vec![2], vec![3]).unwrap();
        assert!(a.check_within(&[5]).is_ok());
        assert!(a.check_within(&[4]).is_err());
        assert!(a.check_within(&[4, 4]).is_err());
    }
}
