//! JWKS documents → verification keys. Asymmetric keys load through jwt-simple's own JWK
//! import (it refuses key material of the wrong type); `oct` keys are HS256 secrets.

use ct_codecs::{Base64UrlSafeNoPadding, Decoder};
use jwt_simple::prelude::*;

// Keys are few and long-lived; boxing the RSA variant would buy nothing.
#[allow(clippy::large_enum_variant)]
/// One verification key; the variant fixes the only algorithm it verifies, so a token's `alg`
/// can never pick a different use of the same key material (no RS/HS confusion).
pub enum VerifyKey {
    Rs256(RS256PublicKey),
    Es256(ES256PublicKey),
    EdDsa(Ed25519PublicKey),
    Hs256(HS256Key),
}

impl VerifyKey {
    pub fn alg(&self) -> &'static str {
        match self {
            Self::Rs256(_) => "RS256",
            Self::Es256(_) => "ES256",
            Self::EdDsa(_) => "EdDSA",
            Self::Hs256(_) => "HS256",
        }
    }
}

pub struct Jwk {
    pub kid: Option<String>,
    pub key: VerifyKey,
}

/// The keys of one provider.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<Jwk>,
}

impl KeySet {
    /// Keys that may verify a token with this `alg` and `kid`: with a `kid`, only the key that
    /// carries it; without one, every key of that algorithm.
    pub fn candidates<'a>(&'a self, alg: &'a str, kid: Option<&'a str>) -> impl Iterator<Item = &'a Jwk> + 'a {
        self.keys.iter().filter(move |k| {
            k.key.alg() == alg
                && match kid {
                    Some(kid) => k.kid.as_deref() == Some(kid),
                    None => true,
                }
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Parse a JWKS. Keys of unsupported types are skipped (and counted in the returned list of
/// skipped reasons); a document with no usable key at all is an error.
pub fn parse_jwks(doc: &serde_json::Value, allowed_algs: &[String]) -> Result<(KeySet, Vec<String>), String> {
    let keys = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| "JWKS must be an object with a `keys` array".to_string())?;
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for (i, jwk) in keys.iter().enumerate() {
        match parse_jwk(jwk) {
            Ok(k) if allowed_algs.iter().any(|a| a == k.key.alg()) => set.keys.push(k),
            Ok(k) => skipped.push(format!("keys[{i}]: algorithm {} not in the provider's `algorithms`", k.key.alg())),
            Err(e) => skipped.push(format!("keys[{i}]: {e}")),
        }
    }
    if set.keys.is_empty() {
        let why = if skipped.is_empty() { "the `keys` array is empty".to_string() } else { skipped.join("; ") };
        return Err(format!("JWKS has no usable key ({why})"));
    }
    Ok((set, skipped))
}

fn parse_jwk(jwk: &serde_json::Value) -> Result<Jwk, String> {
    let kty = jwk.get("kty").and_then(|v| v.as_str()).ok_or("missing `kty`")?;
    let kid = jwk.get("kid").and_then(|v| v.as_str()).map(str::to_string);
    let alg = jwk.get("alg").and_then(|v| v.as_str());
    let key = match (kty, alg) {
        ("RSA", None | Some("RS256")) => VerifyKey::Rs256(
            RS256PublicKey::from_jwk(&strip_meta(jwk)).map_err(|e| format!("RSA key: {e}"))?,
        ),
        ("EC", None | Some("ES256")) => VerifyKey::Es256(
            ES256PublicKey::from_jwk(&strip_meta(jwk)).map_err(|e| format!("EC key: {e}"))?,
        ),
        ("OKP", None | Some("EdDSA") | Some("Ed25519")) => VerifyKey::EdDsa(
            Ed25519PublicKey::from_jwk(&strip_meta(jwk)).map_err(|e| format!("OKP key: {e}"))?,
        ),
        ("oct", None | Some("HS256")) => {
            let k = jwk.get("k").and_then(|v| v.as_str()).ok_or("oct key without `k`")?;
            let bytes = Base64UrlSafeNoPadding::decode_to_vec(k, None).map_err(|_| "oct key: `k` is not base64url")?;
            if bytes.len() < 32 {
                return Err("oct key: HS256 secrets must be at least 32 bytes".into());
            }
            VerifyKey::Hs256(HS256Key::from_bytes(&bytes))
        }
        (kty, Some(alg)) => return Err(format!("unsupported key type/algorithm {kty}/{alg}")),
        (kty, None) => return Err(format!("unsupported key type {kty}")),
    };
    Ok(Jwk { kid, key })
}

/// jwt-simple validates JWK metadata strictly (e.g. `alg` spelling); we have already matched the
/// algorithm ourselves, so hand it only the members that describe the key.
fn strip_meta(jwk: &serde_json::Value) -> String {
    let mut out = serde_json::Map::new();
    if let Some(obj) = jwk.as_object() {
        for name in ["kty", "crv", "x", "y", "n", "e"] {
            if let Some(v) = obj.get(name) {
                out.insert(name.to_string(), v.clone());
            }
        }
    }
    serde_json::Value::Object(out).to_string()
}
