//! VNC authentication (security type 2): the response to a 16-byte
//! challenge is DES-ECB over its two halves, keyed with the password's first
//! 8 bytes (zero-padded), each key byte bit-reversed (the classic VNC quirk).
//! DES is weak: Porthole uses it only towards hypervisors, ideally inside TLS
//! (VeNCrypt X509Vnc), and never offers it to clients.

use des::Des;
use des::cipher::{Block, BlockEncrypt, KeyInit};

fn encrypt(key: &[u8; 8], data: &mut [u8]) {
    let cipher = Des::new_from_slice(key).expect("DES takes 8-byte keys");
    for half in data.chunks_exact_mut(8) {
        let mut block: Block<Des> = <[u8; 8]>::try_from(&*half).expect("8-byte blocks").into();
        cipher.encrypt_block(&mut block);
        half.copy_from_slice(&block);
    }
}

/// The longest password VNC authentication uses; more is ignored by servers.
pub const MAX_PASSWORD_LEN: usize = 8;

/// The response to `challenge` for `password`.
pub fn response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let mut out = *challenge;
    encrypt(&key, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_bit_reversed_and_truncated_to_eight_bytes() {
        let challenge = *b"0123456789abcdef";
        // FIPS 81's DES example key 0x0123456789abcdef, bit-reversed byte by byte.
        let password = [0x80, 0xc4, 0xa2, 0xe6, 0x91, 0xd5, 0xb3, 0xf7];
        let mut expected = challenge;
        encrypt(
            &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef],
            &mut expected,
        );
        assert_eq!(response(&password, &challenge), expected);
        // FIPS 81 / NBS test: key 0123456789abcdef, "Now is t" -> 3fa40e8a984d4815.
        let nbs = response(&password, b"Now is the time ");
        assert_eq!(&nbs[..8], &[0x3f, 0xa4, 0x0e, 0x8a, 0x98, 0x4d, 0x48, 0x15]);
        // Characters past the eighth do not count.
        assert_eq!(
            response(b"labvnc12", &challenge),
            response(b"labvnc12-and-more", &challenge)
        );
        assert_ne!(
            response(b"labvnc12", &challenge),
            response(b"labvnc13", &challenge)
        );
    }
}
