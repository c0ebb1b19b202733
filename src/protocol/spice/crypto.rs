//! SPICE ticket encryption: RSA-1024, OAEP with SHA-1 and an empty label; the
//! plaintext is the password and one NUL. Pure functions over keys the caller
//! holds (the key pool, with its rotation, lives with the runtime).

use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};

use super::link::TICKET_CIPHERTEXT_LEN;
use super::messages::PUBKEY_LEN;

/// The SPICE protocol's password limit (`SPICE_MAX_PASSWORD_LENGTH`).
pub const MAX_PASSWORD_LEN: usize = 60;

/// Why a ticket could not be encrypted or decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketCryptoError {
    /// The peer's public key is not a DER RSA key of the SPICE size.
    #[error("the link reply's public key is not a 1024-bit RSA key")]
    BadPublicKey,
    /// No alignment of the ciphertext decrypts under this key.
    #[error("the ticket does not decrypt under this link's key")]
    Undecryptable,
    /// The password is longer than SPICE allows.
    #[error("password longer than {MAX_PASSWORD_LEN} bytes")]
    PasswordTooLong,
}

/// The 162-byte DER SubjectPublicKeyInfo a link reply carries.
pub fn public_key_der(key: &RsaPublicKey) -> Option<[u8; PUBKEY_LEN]> {
    let der = key.to_public_key_der().ok()?;
    der.as_bytes().try_into().ok()
}

/// Encrypts `password` to the key from a hypervisor's link reply.
pub fn encrypt_ticket(
    rng: &mut (impl rand::CryptoRng + rand::RngCore),
    public_key: &[u8; PUBKEY_LEN],
    password: &[u8],
) -> Result<[u8; TICKET_CIPHERTEXT_LEN], TicketCryptoError> {
    if password.len() > MAX_PASSWORD_LEN {
        return Err(TicketCryptoError::PasswordTooLong);
    }
    let key = RsaPublicKey::from_public_key_der(public_key)
        .map_err(|_| TicketCryptoError::BadPublicKey)?;
    if key.size() != TICKET_CIPHERTEXT_LEN {
        return Err(TicketCryptoError::BadPublicKey);
    }
    let mut plain = password.to_vec();
    plain.push(0);
    let ct = key
        .encrypt(rng, Oaep::new::<sha1::Sha1>(), &plain)
        .map_err(|_| TicketCryptoError::BadPublicKey)?;
    ct.try_into().map_err(|_| TicketCryptoError::BadPublicKey)
}

/// Decrypts a client's ticket; returns the password (up to its first NUL).
///
/// spice-html5 0.3 writes the ciphertext's big-endian integer without its
/// leading zero bytes, left-aligned in the 128-byte buffer, so about 1 link in
/// 256 arrives shifted with zeros at the end. When the buffer does not
/// decrypt as it is, the realigned buffers (shifted right by 1, 2, ... of its
/// trailing zero bytes, at most 3) are tried before giving up.
pub fn decrypt_ticket(
    key: &RsaPrivateKey,
    ciphertext: &[u8; TICKET_CIPHERTEXT_LEN],
) -> Result<Vec<u8>, TicketCryptoError> {
    let attempt = |ct: &[u8]| {
        key.decrypt(Oaep::new::<sha1::Sha1>(), ct)
            .ok()
            .map(|mut plain| {
                if let Some(nul) = plain.iter().position(|&b| b == 0) {
                    plain.truncate(nul);
                }
                plain
            })
    };
    if let Some(plain) = attempt(ciphertext) {
        return Ok(plain);
    }
    let trailing = ciphertext.iter().rev().take_while(|&&b| b == 0).count();
    for shift in 1..=trailing.min(3) {
        let mut realigned = [0u8; TICKET_CIPHERTEXT_LEN];
        realigned[shift..].copy_from_slice(&ciphertext[..TICKET_CIPHERTEXT_LEN - shift]);
        if let Some(plain) = attempt(&realigned) {
            return Ok(plain);
        }
    }
    Err(TicketCryptoError::Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn key() -> RsaPrivateKey {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        RsaPrivateKey::new(&mut rng, 1024).unwrap()
    }

    #[test]
    fn a_ticket_round_trips_through_the_link_reply_key() {
        let key = key();
        let der = public_key_der(&key.to_public_key()).expect("162 bytes");
        assert_eq!(&der[..3], &[0x30, 0x81, 0x9f], "DER SubjectPublicKeyInfo");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let ct = encrypt_ticket(&mut rng, &der, b"labspice1").unwrap();
        assert_eq!(decrypt_ticket(&key, &ct).unwrap(), b"labspice1");
        // An empty ticket (a hypervisor with ticketing off) is one NUL.
        let ct = encrypt_ticket(&mut rng, &der, b"").unwrap();
        assert_eq!(decrypt_ticket(&key, &ct).unwrap(), b"");
    }

    #[test]
    fn spice_html5s_left_aligned_ciphertext_is_realigned() {
        let key = key();
        let der = public_key_der(&key.to_public_key()).unwrap();
        // Find a ciphertext with a leading zero byte (1 in 256) and send it
        // as spice-html5 0.3 does: the zero dropped, a zero at the end.
        for seed in 0..5_000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let ct = encrypt_ticket(&mut rng, &der, b"ticket").unwrap();
            if ct[0] != 0 || ct[1] == 0 {
                continue;
            }
            let mut sent = [0u8; TICKET_CIPHERTEXT_LEN];
            sent[..127].copy_from_slice(&ct[1..]);
            assert_eq!(decrypt_ticket(&key, &sent).unwrap(), b"ticket");
            return;
        }
        panic!("no ciphertext with a leading zero in 5000 tries");
    }

    #[test]
    fn garbage_and_foreign_keys_do_not_decrypt() {
        let key = key();
        assert_eq!(
            decrypt_ticket(&key, &[0x42; 128]),
            Err(TicketCryptoError::Undecryptable)
        );
        assert_eq!(
            decrypt_ticket(&key, &[0; 128]),
            Err(TicketCryptoError::Undecryptable)
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let other = RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let der = public_key_der(&other.to_public_key()).unwrap();
        let ct = encrypt_ticket(&mut rng, &der, b"x").unwrap();
        assert_eq!(
            decrypt_ticket(&key, &ct),
            Err(TicketCryptoError::Undecryptable)
        );
        assert_eq!(
            encrypt_ticket(&mut rng, &[0; PUBKEY_LEN], b"x"),
            Err(TicketCryptoError::BadPublicKey)
        );
        assert_eq!(
            encrypt_ticket(&mut rng, &der, &[b'a'; 61]),
            Err(TicketCryptoError::PasswordTooLong)
        );
    }
}
