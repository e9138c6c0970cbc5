//! Hashes and fingerprints. A credential is only ever stored, logged or sent as its
//! fingerprint: the first 16 bytes of its SHA-256, in hex.

pub fn sha256(data: &[u8]) -> [u8; 32] {
    hmac_sha256::Hash::hash(data)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// `sha256:` + 32 hex digits of the credential's hash.
pub fn fingerprint(hash: &[u8; 32]) -> String {
    format!("sha256:{}", hex(&hash[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(hex(&sha256(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn fingerprint_is_truncated_and_never_the_secret() {
        let fp = fingerprint(&sha256(b"my-secret-key"));
        assert!(fp.starts_with("sha256:"));
        assert_eq!(fp.len(), 7 + 32);
        assert!(!fp.contains("my-secret-key"));
    }
}
