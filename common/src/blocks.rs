//! Block digests for comparing two copies of a disk block by block (resync, reprotect to the
//! original location): XXH3-128 of each block, the digest rsync negotiates too. Both ends of a
//! comparison use these functions, so they agree by construction. A comparison only decides
//! which blocks to send; whether a replica equals its source is proven separately, by the
//! BLAKE3 whole-disk digests of `item verify`.

use twox_hash::XxHash3_128;

/// Bytes in a block digest.
pub const DIGEST_LEN: usize = 16;

/// The digest of one block.
pub type BlockDigest = [u8; DIGEST_LEN];

/// The digest of `block`.
pub fn digest(block: &[u8]) -> BlockDigest {
    XxHash3_128::oneshot(block).to_le_bytes()
}

/// A digest computed from pieces of a block given in order: equal to [`digest`] of their
/// concatenation.
#[derive(Default)]
pub struct Hasher(XxHash3_128);

impl Hasher {
    pub fn new() -> Self {
        Self(XxHash3_128::new())
    }

    pub fn update(&mut self, piece: &[u8]) {
        self.0.write(piece);
    }

    pub fn finish(&self) -> BlockDigest {
        self.0.finish_128().to_le_bytes()
    }
}

/// The digest of `len` zero bytes (a hole, which reads as zeros).
pub fn zeros(len: u64) -> BlockDigest {
    const PIECE: usize = 1 << 20;
    let zeros = vec![0u8; PIECE];
    let mut hasher = Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(PIECE).min(PIECE);
        hasher.update(&zeros[..n]);
        left -= n as u64;
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_zeros_and_oneshot_agree() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut h = Hasher::new();
        for piece in data.chunks(4099) {
            h.update(piece);
        }
        assert_eq!(h.finish(), digest(&data));
        assert_eq!(zeros(3 << 20), digest(&vec![0u8; 3 << 20]));
        assert_ne!(digest(&data[..1000]), digest(&data[1..1001]));
    }
}
