//! Consistent weighted choice: weighted rendezvous (highest-random-weight) hashing.
//!
//! For a flow key `k` and candidate targets `i` with weights `w_i` and identities `t_i` (a
//! stable hash of what the target *is*, never of where it sits in a list), each target scores
//!
//! ```text
//! h_i = pair_hash(k, t_i)                      64-bit, see below
//! u_i = (2 * (h_i >> 12) + 1) / 2^53           uniform in (0, 1), exactly representable
//! score_i = w_i / -ln(u_i)                     -ln(u_i) is Exp(1), so score_i^-1 ~ Exp(w_i)
//! ```
//!
//! and the highest score wins (ties, which need equal scores to the last bit, go to the larger
//! identity). Because `1 / score_i` are independent exponentials with rates `w_i`, target `i`
//! wins with probability `w_i / Σ w` (Schindelhauer & Schomaker, "Weighted distributed hash
//! tables", 2005). Each target's score depends only on the key and that target, so:
//!
//! * any two routers holding the same targets pick the same one for the same key, whatever
//!   order the targets were added in;
//! * removing a target moves only the keys it had won (every other score is unchanged), and
//!   adding one moves only the keys it now wins.
//!
//! **Determinism.** `pair_hash` is pure integer arithmetic. The logarithm is computed here (not
//! by the platform's libm, whose last-bit rounding differs between C libraries) with only
//! IEEE-754 binary64 `+ − × ÷` in a fixed order, which Rust never fuses or reorders, so every
//! score is bit-identical on every platform with IEEE doubles; a fixture test pins choices.

use core::f64::consts::{LN_2, SQRT_2};

/// Mixes 64 bits into 64 bits, bijectively, with full avalanche (Stafford's "Mix13" variant of
/// the MurmurHash3 finalizer, as used by SplitMix64).
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Domain separation for [`pair_hash`].
const PAIR_SEED: u64 = 0x5345_5256_414c_5257; // "SERVALRW"

/// The 64-bit hash of a (flow key, target identity) pair that drives the choice.
///
/// `mix64(mix64(key ^ SEED) ^ target)`: for a fixed key the inner value is a random-looking
/// 64-bit constant, and the outer mix of it XOR each target's (itself random-looking) identity
/// gives independent-looking values per target.
pub fn pair_hash(flow_key: u64, target: u64) -> u64 {
    mix64(mix64(flow_key ^ PAIR_SEED) ^ target)
}

/// `1 / (2k + 1)` for the `atanh` series of [`ln`]; divisions of exact integers, so each is the
/// correctly rounded value on every IEEE platform (and evaluated at compile time).
const ATANH: [f64; 11] = [
    1.0,
    1.0 / 3.0,
    1.0 / 5.0,
    1.0 / 7.0,
    1.0 / 9.0,
    1.0 / 11.0,
    1.0 / 13.0,
    1.0 / 15.0,
    1.0 / 17.0,
    1.0 / 19.0,
    1.0 / 21.0,
];

/// Natural logarithm of a positive normal `x`, within a few ulps, using `+ − × ÷` only.
///
/// `x = m · 2^e` with `m` in `(√½, √2]`; `ln m = 2 atanh(s)` with `s = (m − 1) / (m + 1)`,
/// `|s| ≤ 0.1716`, summed to `s^21`, past which the terms are below 2^-53 of the result.
/// `m − 1` is exact (Sterbenz), so the relative error stays small near `x = 1` too.
pub(crate) fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut p = ATANH[ATANH.len() - 1];
    for c in ATANH.iter().rev().skip(1) {
        p = p * z + c;
    }
    f64::from(e) * LN_2 + 2.0 * s * p
}

/// The rendezvous score of a target of weight `weight` whose pair hash is `h`.
pub(crate) fn score(weight: u32, h: u64) -> f64 {
    // (2j + 1) / 2^53 with j < 2^52: exact, in [2^-53, 1 - 2^-53], so -ln(u) > 0.
    let u = ((h >> 12) as f64 * 2.0 + 1.0) * (1.0 / 9_007_199_254_740_992.0);
    f64::from(weight) / -ln(u)
}

/// Index of the winner among `(identity, weight)` candidates for `flow_key`; `None` if there
/// are none. Weights must be non-zero.
pub(crate) fn choose(
    flow_key: u64,
    candidates: impl IntoIterator<Item = (u64, u32)>,
) -> Option<usize> {
    let mut best: Option<(f64, u64, usize)> = None;
    for (i, (ident, weight)) in candidates.into_iter().enumerate() {
        let s = score(weight, pair_hash(flow_key, ident));
        let better = match best {
            None => true,
            Some((bs, bi, _)) => s > bs || (s == bs && ident > bi),
        };
        if better {
            best = Some((s, ident, i));
        }
    }
    best.map(|(_, _, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_libm_closely() {
        let mut x = 1.0f64;
        let mut probes = vec![
            f64::MIN_POSITIVE,
            2f64.powi(-53),
            0.5,
            0.75,
            1.0 - 2f64.powi(-53),
        ];
        for _ in 0..2000 {
            x = x * 0.987_654_321 + 1e-300;
            probes.push(x);
        }
        for i in 1..2000 {
            probes.push(1.0 - f64::from(i) * 1e-9);
            probes.push(f64::from(i) / 2000.0);
        }
        for &p in &probes {
            let (ours, libm) = (ln(p), p.ln());
            let err = (ours - libm).abs() / libm.abs().max(f64::MIN_POSITIVE);
            assert!(err < 1e-14, "ln({p:e}) = {ours:e}, libm {libm:e}");
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn scores_are_finite_and_positive_at_the_extremes() {
        for h in [0, 1, u64::MAX, 1 << 63, (1 << 12) - 1] {
            let s = score(1, h);
            assert!(s.is_finite() && s > 0.0, "{h:x}: {s}");
        }
        // A larger hash means u closer to 1, -ln(u) closer to 0: a higher score.
        assert!(score(1, u64::MAX) > score(1, 1 << 63));
        assert!(score(2, 1 << 63) > score(1, 1 << 63));
    }

    #[test]
    fn fixture_pins_the_function() {
        // Changing the hash, the log or the score changes which router picks what: bump the
        // table version deliberately if this has to change.
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
        // 3 / -ln((2^52 + 1) / 2^53), which CPython's libm agrees with to the last bit.
        assert_eq!(score(3, 1 << 63).to_bits(), 0x4011_4ff5_8be0_a240);
        let picks: Vec<usize> = (0..12u64)
            .filter_map(|k| choose(k, [(11, 1), (22, 2), (33, 3)]))
            .collect();
        assert_eq!(picks, PICKS);
    }

    /// Winners for keys 0..12 among identities 11, 22, 33 of weights 1, 2, 3.
    const PICKS: [usize; 12] = [0, 1, 1, 1, 1, 2, 0, 1, 2, 2, 1, 2];
}
