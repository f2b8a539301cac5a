//! Rendezvous (highest random weight) hashing of a login onto a chunk.
//!
//! Every (initiator, target, chunk) triple gets a pseudo-random weight; a
//! login goes to the live chunk with the highest weight. Removing a chunk
//! therefore moves only the logins that chunk had won, and adding one takes
//! a fair share from every other chunk. The weight is a fixed function
//! (FNV-1a folded through the splitmix64 finaliser), identical in every
//! redirector and across releases, so all redirectors agree and tests can
//! compute the expected chunk.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `chunk` for a login of `initiator` (compared
/// case-insensitively, as IQNs are) to `target`.
pub fn weight(initiator: &str, target: &str, chunk: u64) -> u64 {
    let mut h = FNV_OFFSET;
    for b in initiator.bytes() {
        h = fnv(h, &[b.to_ascii_lowercase()]);
    }
    h = fnv(h, &[0]);
    h = fnv(h, target.as_bytes());
    h = fnv(h, &[0]);
    h = fnv(h, &chunk.to_le_bytes());
    splitmix(h)
}

/// The chunk a login of `initiator` to `target` goes to: the highest
/// [`weight`] among `chunks` (ties, practically impossible, go to the lower
/// id). `None` when there is no chunk.
pub fn choose(initiator: &str, target: &str, chunks: impl IntoIterator<Item = u64>) -> Option<u64> {
    chunks
        .into_iter()
        .map(|c| (weight(initiator, target, c), std::cmp::Reverse(c)))
        .max()
        .map(|(_, std::cmp::Reverse(c))| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const TARGET: &str = "iqn.2026-11.dev.ironblock:t1";

    fn initiators(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("iqn.2026-11.dev.test:initiator-{i}"))
            .collect()
    }

    fn spread(names: &[String], target: &str, chunks: &[u64]) -> BTreeMap<u64, usize> {
        let mut m: BTreeMap<u64, usize> = chunks.iter().map(|c| (*c, 0)).collect();
        for n in names {
            let c = choose(n, target, chunks.iter().copied()).unwrap();
            *m.get_mut(&c).unwrap() += 1;
        }
        m
    }

    #[test]
    fn hundred_initiators_spread_evenly_over_three_chunks() {
        let names = initiators(100);
        let m = spread(&names, TARGET, &[1, 2, 3]);
        println!("spread over chunks 1,2,3: {m:?}");
        for (chunk, n) in &m {
            // 100/3 = 33.3 +- 20% -> 26.7 ..= 40.
            assert!((27..=40).contains(n), "chunk {chunk} got {n} of 100: {m:?}");
        }
    }

    #[test]
    fn the_weight_is_unbiased_over_many_initiators() {
        // 100 names are a small sample (one standard deviation is 4.7
        // logins); over 30000 every chunk must be within 3% of even.
        let names = initiators(30_000);
        let m = spread(&names, TARGET, &[1, 2, 3]);
        for (chunk, n) in &m {
            assert!((9_700..=10_300).contains(n), "chunk {chunk} got {n}: {m:?}");
        }
        // Over 100 targets of 100 initiators each, the share of 100-name
        // samples with a chunk outside +-20% is what a uniform hash gives
        // (binomial tails: about 30%), no worse.
        let mut outside = 0;
        for t in 0..100 {
            let m = spread(&initiators(100), &format!("{TARGET}{t}"), &[1, 2, 3]);
            if m.values().any(|n| !(27..=40).contains(n)) {
                outside += 1;
            }
        }
        println!("100-initiator samples outside +-20%: {outside} of 100");
        assert!(outside <= 40, "{outside} of 100 samples uneven");
    }

    #[test]
    fn removing_a_chunk_moves_only_its_initiators() {
        let names = initiators(100);
        let before: Vec<u64> = names
            .iter()
            .map(|n| choose(n, TARGET, [1, 2, 3]).unwrap())
            .collect();
        let after: Vec<u64> = names
            .iter()
            .map(|n| choose(n, TARGET, [1, 3]).unwrap())
            .collect();
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == 2 {
                assert_ne!(*a, 2);
                moved += 1;
            } else {
                assert_eq!(a, b, "an initiator of a surviving chunk moved");
            }
        }
        assert!(moved > 0);
        // Adding a chunk back restores the original choice exactly.
        let again: Vec<u64> = names
            .iter()
            .map(|n| choose(n, TARGET, [3, 2, 1]).unwrap())
            .collect();
        assert_eq!(again, before);
    }

    #[test]
    fn choice_is_case_insensitive_in_the_initiator_and_empty_without_chunks() {
        let a = choose("IQN.1993-08.org.debian:01:ABC", TARGET, [1, 2, 3, 4, 5]);
        let b = choose("iqn.1993-08.org.debian:01:abc", TARGET, [1, 2, 3, 4, 5]);
        assert_eq!(a, b);
        assert_eq!(choose("iqn.x", TARGET, []), None);
        // Different targets of the same initiator spread too.
        let targets: Vec<String> = (1..=60).map(|t| format!("{TARGET}{t}")).collect();
        let mut seen = std::collections::BTreeSet::new();
        for t in &targets {
            seen.insert(choose("iqn.x:one", t, [1, 2, 3]).unwrap());
        }
        assert_eq!(seen.len(), 3);
    }
}
