//! Test support: protocol transcripts written as annotated hex, and the
//! splits every transcript is fed in (whole, byte by byte, random cuts).

use super::WireError;

/// Hex with spaces, newlines and `#` comments, as transcripts are written.
pub(crate) fn hex(annotated: &str) -> Vec<u8> {
    let digits: String = annotated
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<String>()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// A fixed-seed xorshift stream: the same "arbitrary" values every run, so
/// a failure replays.
pub(crate) struct Noise(u32);

impl Noise {
    pub(crate) fn new(seed: u32) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// `n` bytes of it.
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Cut points for feeding `len` bytes: none (whole), after every byte, and 50
/// pseudo-random splits (fixed seed, so a failure replays).
pub(crate) fn splits(len: usize) -> Vec<Vec<usize>> {
    let mut all = vec![Vec::new(), (1..len).collect()];
    let mut noise = Noise::new(0x9e37_79b9);
    for _ in 0..50 {
        let mut cuts = Vec::new();
        let mut at = 0;
        loop {
            at += 1 + (noise.next() as usize % 23);
            if at >= len {
                break;
            }
            cuts.push(at);
        }
        all.push(cuts);
    }
    all
}

/// `bytes` cut at `cuts`, as a peer's sends would arrive (cut points past
/// the end are ignored).
pub(crate) fn chunks<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let inside = cuts.iter().filter(|&&c| c > 0 && c < bytes.len());
    for &end in inside.chain(std::iter::once(&bytes.len())) {
        out.push(&bytes[start..end]);
        start = end;
    }
    out
}

/// Feeds `bytes` to a decoder of "everything received so far", in every
/// split, and returns its first answer that is not `Incomplete`: the same in
/// every split, or the test fails.
pub(crate) fn in_every_split<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, WireError> + Copy,
) -> Result<T, WireError> {
    let feed = |cuts: &[usize]| {
        let mut received = Vec::new();
        for chunk in chunks(bytes, cuts) {
            received.extend_from_slice(chunk);
            match decode(&received) {
                Err(WireError::Incomplete) => continue,
                other => return other,
            }
        }
        Err(WireError::Incomplete)
    };
    let whole = feed(&[]);
    for cuts in splits(bytes.len()) {
        assert_eq!(feed(&cuts), whole, "split at {cuts:?}");
    }
    whole
}
