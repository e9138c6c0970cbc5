//! The project's own error types. Library errors (serde, regorus, jwt-simple) are wrapped here,
//! at the boundary, so callers see stable reason codes and never another crate's internals.

use std::fmt;

/// A configuration that cannot be used. Rejected by `on_configure` with one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the field at fault, e.g. `identity.jwt.providers[0].jwks`.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: &str, message: &str) -> Self {
        Self { field: field.to_string(), message: message.to_string() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Why a request's credential was not accepted. Each variant is a stable reason code that
/// clients see in the 401 body and operators see in `warden.identity_failures.<code>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    MissingCredential,
    MalformedHeader,
    TokenTooLarge,
    MalformedToken,
    AlgorithmNotAllowed,
    UnknownIssuer,
    UnknownKey,
    KeysUnavailable,
    BadSignature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    MissingExp,
    AudienceNotAllowed,
    UnknownApiKey,
    UntrustedSpiffeId,
    /// None of the provider's subject claims is a non-empty string.
    MissingSubject,
    /// The subject holds control characters (CR, LF, NUL, …): it could not travel as a header.
    InvalidSubject,
    /// `Authorization: DPoP <token>` without a `DPoP` proof header (RFC 9449).
    DpopProofMissing,
    /// More than one `DPoP` header: which one the upstream reads is anyone's guess.
    DpopProofAmbiguous,
    /// The proof is not a DPoP proof we accept: malformed, too large, wrong `typ`, an algorithm
    /// other than ES256/EdDSA, a `jwk` that is not a public key, a bad signature, no `jti`/`iat`.
    DpopProofInvalid,
    /// The proof's `iat` is older than the window allows.
    DpopProofExpired,
    /// The proof's `iat` is further ahead than the clock skew allows.
    DpopProofInFuture,
    /// The proof was made for another method (`htm`).
    DpopHtmMismatch,
    /// The proof was made for another URL (`htu`).
    DpopHtuMismatch,
    /// The proof was made for another access token (`ath`).
    DpopAthMismatch,
    /// The proof's key is not the key the token is bound to (`cnf.jkt`), or the token presented
    /// under the `DPoP` scheme is bound to no key at all.
    DpopKeyMismatch,
    /// The proof's `jti` was already used (at this proxy or, through the state service, another).
    DpopReplayed,
}

impl IdentityError {
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingCredential => "credential_missing",
            Self::MalformedHeader => "header_malformed",
            Self::TokenTooLarge => "token_too_large",
            Self::MalformedToken => "token_malformed",
            Self::AlgorithmNotAllowed => "token_algorithm_not_allowed",
            Self::UnknownIssuer => "token_issuer_not_allowed",
            Self::UnknownKey => "token_key_unknown",
            Self::KeysUnavailable => "token_keys_unavailable",
            Self::BadSignature => "token_signature_invalid",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::IssuedInFuture => "token_issued_in_future",
            Self::MissingExp => "token_exp_missing",
            Self::AudienceNotAllowed => "token_audience_not_allowed",
            Self::UnknownApiKey => "api_key_unknown",
            Self::UntrustedSpiffeId => "spiffe_id_not_trusted",
            Self::MissingSubject => "token_subject_missing",
            Self::InvalidSubject => "token_subject_invalid",
            Self::DpopProofMissing => "dpop_proof_missing",
            Self::DpopProofAmbiguous => "dpop_proof_ambiguous",
            Self::DpopProofInvalid => "dpop_proof_invalid",
            Self::DpopProofExpired => "dpop_proof_expired",
            Self::DpopProofInFuture => "dpop_proof_in_future",
            Self::DpopHtmMismatch => "dpop_htm_mismatch",
            Self::DpopHtuMismatch => "dpop_htu_mismatch",
            Self::DpopAthMismatch => "dpop_ath_mismatch",
            Self::DpopKeyMismatch => "dpop_key_mismatch",
            Self::DpopReplayed => "dpop_replayed",
        }
    }

    /// A failure of the DPoP proof (RFC 9449): answered with `WWW-Authenticate: DPoP`.
    pub fn is_dpop(self) -> bool {
        self.code().starts_with("dpop_")
    }

    /// The RFC 6750 error code that goes in `WWW-Authenticate` (RFC 9449 §7.1 for DPoP proofs).
    pub fn bearer_error(self) -> Option<&'static str> {
        match self {
            Self::MissingCredential => None,
            e if e.is_dpop() && e != Self::DpopKeyMismatch => Some("invalid_dpop_proof"),
            Self::MalformedHeader => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }

    /// A bad header byte is a malformed request (400); everything else is unauthenticated (401).
    pub fn status(self) -> u32 {
        match self {
            Self::MalformedHeader => 400,
            _ => 401,
        }
    }
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A policy that failed to compile or to evaluate, or gave an output of the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

/// A policy directory, or a file in it, that cannot be read. The message starts with the path
/// at fault (and, for JSON, the line and column), the way a compiler names a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError(pub String);

/// Errors that are one message for a person: shown as that message.
macro_rules! message_errors {
    ($($name:ident),*) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::error::Error for $name {}
    )*};
}

message_errors!(PolicyError, LoadError);
