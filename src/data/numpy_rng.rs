//! Bit-exact ports of the NumPy random generators that megatron-core uses.
//!
//! * [`RandomState`]: legacy `numpy.random.RandomState(seed)` (MT19937 seeded with
//!   `init_genrand`, as NumPy's `_legacy_seeding` does for integer seeds), with `shuffle` and
//!   `permutation`. GPTDataset builds its document and shuffle indices with it.
//! * [`Pcg64Generator`]: `numpy.random.default_rng(seed)` (SeedSequence → PCG64) with
//!   `integers(low, high, dtype=int32)`; `MockGPTLowLevelDataset` draws its document lengths
//!   with it.
//!
//! Both must reproduce NumPy's streams exactly, otherwise sample order differs from Megatron.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// Legacy NumPy `RandomState` (MT19937).
#[derive(Clone)]
pub struct RandomState {
    key: [u32; N],
    pos: usize,
}

impl std::fmt::Debug for RandomState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RandomState").field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl RandomState {
    /// `numpy.random.RandomState(seed)` for an integer seed in `[0, 2^32-1]`.
    pub fn new(seed: u32) -> Self {
        let mut key = [0u32; N];
        key[0] = seed;
        for i in 1..N {
            let prev = key[i - 1];
            key[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        RandomState { key, pos: N }
    }

    /// The raw state words (for tests against NumPy's `get_state()`).
    pub fn key(&self) -> &[u32; N] {
        &self.key
    }

    fn generate(&mut self) {
        for i in 0..N - M {
            let y = (self.key[i] & UPPER_MASK) | (self.key[i + 1] & LOWER_MASK);
            self.key[i] = self.key[i + M] ^ (y >> 1) ^ (if y & 1 != 0 { MATRIX_A } else { 0 });
        }
        for i in N - M..N - 1 {
            let y = (self.key[i] & UPPER_MASK) | (self.key[i + 1] & LOWER_MASK);
            self.key[i] = self.key[i + M - N] ^ (y >> 1) ^ (if y & 1 != 0 { MATRIX_A } else { 0 });
        }
        let y = (self.key[N - 1] & UPPER_MASK) | (self.key[0] & LOWER_MASK);
        self.key[N - 1] = self.key[M - 1] ^ (y >> 1) ^ (if y & 1 != 0 { MATRIX_A } else { 0 });
        self.pos = 0;
    }

    /// Next tempered 32-bit output (`mt19937_next32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.generate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `mt19937_next64`: high word first.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        (hi << 32) | self.next_u32() as u64
    }

    /// NumPy's `random_interval(max)`: uniform in `[0, max]` by masked rejection sampling.
    pub fn random_interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        mask |= mask >> 1;
        mask |= mask >> 2;
        mask |= mask >> 4;
        mask |= mask >> 8;
        mask |= mask >> 16;
        mask |= mask >> 32;
        if max <= 0xffff_ffff {
            loop {
                let v = self.next_u32() as u64 & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let v = self.next_u64() & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }

    /// Legacy `RandomState.shuffle` of a 1-D array (Fisher–Yates from the end).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        let n = x.len();
        for i in (1..n).rev() {
            let j = self.random_interval(i as u64) as usize;
            x.swap(i, j);
        }
    }

    /// `RandomState.permutation(n)`.
    pub fn permutation(&mut self, n: usize) -> Vec<i64> {
        let mut v: Vec<i64> = (0..n as i64).collect();
        self.shuffle(&mut v);
        v
    }
}

// ---- SeedSequence + PCG64 (numpy.random.default_rng) ----

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// `numpy.random.SeedSequence(entropy).generate_state(n_words, uint64)` for an integer
/// entropy without spawn key.
pub fn seed_sequence_u64(entropy: u128, n_words: usize) -> Vec<u64> {
    // _int_to_uint32_array: little-endian 32-bit words, at least one word.
    let mut ent = Vec::new();
    let mut e = entropy;
    if e == 0 {
        ent.push(0u32);
    }
    while e > 0 {
        ent.push(e as u32);
        e >>= 32;
    }
    let mut pool = [0u32; POOL_SIZE];
    let mut hc = INIT_A;
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(ent.get(i).copied().unwrap_or(0), &mut hc);
    }
    for i_src in 0..POOL_SIZE {
        for i_dst in 0..POOL_SIZE {
            if i_src != i_dst {
                let h = hashmix(pool[i_src], &mut hc);
                pool[i_dst] = mix(pool[i_dst], h);
            }
        }
    }
    for &word in ent.iter().skip(POOL_SIZE) {
        for p in pool.iter_mut() {
            let h = hashmix(word, &mut hc);
            *p = mix(*p, h);
        }
    }
    let mut hc = INIT_B;
    let words32: Vec<u32> = (0..n_words * 2)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hc;
            hc = hc.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hc);
            v ^ (v >> XSHIFT)
        })
        .collect();
    words32.chunks(2).map(|c| c[0] as u64 | ((c[1] as u64) << 32)).collect()
}

const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) | 4_865_540_595_714_422_341u128;

/// `numpy.random.default_rng(seed)`: PCG64 (XSL-RR 128/64) seeded through SeedSequence.
#[derive(Debug, Clone)]
pub struct Pcg64Generator {
    state: u128,
    inc: u128,
    has_u32: bool,
    uinteger: u32,
}

impl Pcg64Generator {
    /// `numpy.random.default_rng(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        let s = seed_sequence_u64(seed as u128, 4);
        let initstate = ((s[0] as u128) << 64) | s[1] as u128;
        let initseq = ((s[2] as u128) << 64) | s[3] as u128;
        let mut g =
            Pcg64Generator { state: 0, inc: (initseq << 1) | 1, has_u32: false, uinteger: 0 };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// Next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let xored = ((self.state >> 64) as u64) ^ (self.state as u64);
        xored.rotate_right((self.state >> 122) as u32)
    }

    /// Next 32-bit output; NumPy buffers the high half of a 64-bit draw.
    pub fn next_u32(&mut self) -> u32 {
        if self.has_u32 {
            self.has_u32 = false;
            return self.uinteger;
        }
        let next = self.next_u64();
        self.has_u32 = true;
        self.uinteger = (next >> 32) as u32;
        next as u32
    }

    /// `Generator.integers(low, high, size=n, dtype=numpy.int32)` (high exclusive), using
    /// NumPy's Lemire rejection for 32-bit bounded ints.
    pub fn integers_i32(&mut self, low: i32, high: i32, n: usize) -> Vec<i32> {
        assert!(high > low, "integers: high must exceed low");
        let rng = (high as i64 - low as i64 - 1) as u32;
        (0..n)
            .map(|_| {
                if rng == 0 {
                    return low;
                }
                let rng_excl = rng as u64 + 1;
                let mut m = self.next_u32() as u64 * rng_excl;
                let mut leftover = m as u32;
                if (leftover as u64) < rng_excl {
                    let threshold = ((u32::MAX - rng) as u64 % rng_excl) as u32;
                    while leftover < threshold {
                        m = self.next_u32() as u64 * rng_excl;
                        leftover = m as u32;
                    }
                }
                (low as i64 + (m >> 32) as i64) as i32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        let mut r = RandomState::new(1234);
        assert_eq!(&r.key()[..4], &[1234, 3159640283, 4062961311, 3954462607]);
        let first: Vec<u32> = (0..5).map(|_| r.next_u32()).collect();
        assert_eq!(first, vec![822569775, 2137449171, 2671936806, 3512589365, 1880026316]);
        assert_eq!(RandomState::new(1234).permutation(10), vec![7, 2, 9, 1, 0, 8, 4, 5, 6, 3]);
        assert_eq!(RandomState::new(0).permutation(10), vec![2, 8, 4, 9, 1, 6, 7, 3, 0, 5]);
        let mut r = RandomState::new(1234);
        let mut a: Vec<u32> = (0..10).collect();
        r.shuffle(&mut a);
        let mut b: Vec<u32> = (0..5).collect();
        r.shuffle(&mut b);
        assert_eq!(a, vec![7, 2, 9, 1, 0, 8, 4, 5, 6, 3]);
        assert_eq!(b, vec![0, 4, 3, 2, 1]);
    }
}
