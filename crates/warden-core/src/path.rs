//! The request path the policy decides on. A policy that matches `/admin` on the raw `:path`
//! is bypassed by `//admin/x`, `/%61dmin/x`, `/./admin/x` or `/x/../admin/x`, which the upstream
//! resolves to `/admin/x`; so the filter decides on one canonical form and refuses encodings on
//! which the filter and an upstream could disagree.
//!
//! The rules, in order (the first one broken refuses the path):
//! 1. `:path` is at most `MAX_PATH_BYTES` bytes (`path_too_long`); `*` alone (`OPTIONS *`) is
//!    kept as it is; anything else starts with `/` (`path_not_origin_form`).
//! 2. Every byte is printable ASCII: NUL is `path_nul`; other controls, space, DEL, `#` and
//!    bytes >= 0x80 are `path_bad_byte` (valid requests percent-encode them).
//! 3. The query (from the first `?`) is kept byte for byte: its meaning is the application's.
//! 4. In the path part: a raw `\` is `path_backslash` (some servers read it as `/`); `%` must be
//!    followed by two hex digits (`path_bad_escape`); `%2F` is `path_encoded_slash` and `%5C`
//!    `path_encoded_backslash` (a segment or a separator, depending on who decodes); `%00` is
//!    `path_nul`; an encoded control (`%01`-`%1F`, `%7F`) is `path_encoded_control`.
//! 5. Percent-encoded unreserved characters (RFC 3986 §2.3: ALPHA DIGIT `-` `.` `_` `~`) are
//!    decoded; every other escape is kept, with upper-case hex (RFC 3986 §6.2.2.1).
//! 6. Empty segments are dropped (`//a///b` is `/a/b`), then dot segments are removed as RFC 3986
//!    §5.2.4 does (after step 5, so `%2e%2E` is `..`); `..` at the root stays at the root.
//!    A trailing `/` is kept, and a path that ends in a dot segment ends in `/`.
//!
//! Work and output are linear in the input and bounded by `MAX_PATH_BYTES`; nothing panics.

use std::fmt;

/// Longer than any `:path` Envoy accepts with its default header limits (60 KiB of headers).
pub const MAX_PATH_BYTES: usize = 64 * 1024;

/// Why a path was refused (400, reasons `path_ambiguous` and this code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    TooLong,
    NotOriginForm,
    Nul,
    BadByte,
    Backslash,
    BadEscape,
    EncodedSlash,
    EncodedBackslash,
    EncodedControl,
}

impl PathError {
    pub fn code(self) -> &'static str {
        match self {
            Self::TooLong => "path_too_long",
            Self::NotOriginForm => "path_not_origin_form",
            Self::Nul => "path_nul",
            Self::BadByte => "path_bad_byte",
            Self::Backslash => "path_backslash",
            Self::BadEscape => "path_bad_escape",
            Self::EncodedSlash => "path_encoded_slash",
            Self::EncodedBackslash => "path_encoded_backslash",
            Self::EncodedControl => "path_encoded_control",
        }
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A canonical request target: the path without its query, and the query as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    pub path: String,
    /// Without the `?`; `Some("")` for a bare `?`.
    pub query: Option<String>,
}

impl CanonicalPath {
    /// The canonical `:path`: the path, then `?` and the query if there was one.
    pub fn target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// The canonical form of a `:path` header value, or why it is refused (rules in the module doc).
pub fn canonicalize(raw: &[u8]) -> Result<CanonicalPath, PathError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    for &b in raw {
        match b {
            0 => return Err(PathError::Nul),
            0x01..=0x20 | 0x7f..=0xff | b'#' => return Err(PathError::BadByte),
            _ => {}
        }
    }
    if raw == b"*" {
        return Ok(CanonicalPath { path: "*".into(), query: None });
    }
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    let (path, query) = match raw.iter().position(|&b| b == b'?') {
        Some(i) => (&raw[..i], Some(&raw[i + 1..])),
        None => (raw, None),
    };
    let decoded = decode_unreserved(path)?;
    let path = remove_dot_segments(&decoded);
    // Every byte was checked to be printable ASCII above: the lossy conversion loses nothing.
    let query = query.map(|q| String::from_utf8_lossy(q).into_owned());
    Ok(CanonicalPath { path, query })
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Step 4 and 5: refuse the ambiguous escapes, decode the unreserved ones.
fn decode_unreserved(path: &[u8]) -> Result<String, PathError> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'\\' {
            return Err(PathError::Backslash);
        }
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (path.get(i + 1).copied().and_then(hex_value), path.get(i + 2).copied().and_then(hex_value)) else {
            return Err(PathError::BadEscape);
        };
        let v = hi * 16 + lo;
        match v {
            0 => return Err(PathError::Nul),
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            0x01..=0x1f | 0x7f => return Err(PathError::EncodedControl),
            _ if is_unreserved(v) => out.push(char::from(v)),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(hi)]));
                out.push(char::from(HEX[usize::from(lo)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// Step 6 on a path that starts with `/` and has no escapes left that could be `/` or `.`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path.split('/').skip(1) {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                kept.pop();
                trailing = true;
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(raw: &str) -> String {
        canonicalize(raw.as_bytes()).map(|c| c.target()).unwrap_or_else(|e| panic!("{raw}: refused ({e})"))
    }

    fn refused(raw: &[u8]) -> &'static str {
        match canonicalize(raw) {
            Ok(c) => panic!("{}: accepted as {}", String::from_utf8_lossy(raw), c.target()),
            Err(e) => e.code(),
        }
    }

    #[test]
    fn the_issues_tricks_resolve_to_the_path_the_upstream_acts_on() {
        for raw in ["//admin/x", "/%61dmin/x", "/./admin/x", "/x/../admin/x", "/%2e/admin/x", "/%2E/admin/x", "/x/%2e%2E/admin/x", "///admin//x", "/x/.%2e/admin/x", "/%41%44MIN"] {
            let c = canon(raw);
            assert!(c == "/admin/x" || c == "/ADMIN", "{raw} -> {c}");
        }
        assert_eq!(canon("/%6dcp"), "/mcp");
        assert_eq!(canon("/%6D%63%70/"), "/mcp/");
    }

    #[test]
    fn dot_segments_above_the_root_stay_at_the_root() {
        assert_eq!(canon("/.."), "/");
        assert_eq!(canon("/../admin/x"), "/admin/x");
        assert_eq!(canon("/../../../etc/passwd"), "/etc/passwd");
        assert_eq!(canon("/a/b/../../.."), "/");
        assert_eq!(canon("/%2e%2e/admin"), "/admin");
    }

    #[test]
    fn trailing_slashes_and_dot_endings() {
        assert_eq!(canon("/"), "/");
        assert_eq!(canon("//"), "/");
        assert_eq!(canon("/admin/"), "/admin/");
        assert_eq!(canon("/admin//"), "/admin/");
        assert_eq!(canon("/admin/."), "/admin/");
        assert_eq!(canon("/admin/x/.."), "/admin/");
        assert_eq!(canon("/admin"), "/admin");
        assert_eq!(canon("/a/./b/."), "/a/b/");
        assert_eq!(canon("/..."), "/...", "three dots are a name");
        assert_eq!(canon("/.hidden/..x"), "/.hidden/..x");
    }

    #[test]
    fn the_query_is_split_off_and_kept_as_it_came() {
        let c = canonicalize(b"/x/../admin?a=%2F&b=/../c&d=%zz").unwrap();
        assert_eq!(c.path, "/admin");
        assert_eq!(c.query.as_deref(), Some("a=%2F&b=/../c&d=%zz"));
        assert_eq!(c.target(), "/admin?a=%2F&b=/../c&d=%zz");
        assert_eq!(canon("/tickets?"), "/tickets?");
        assert_eq!(canon("/tickets"), "/tickets");
        assert_eq!(canon("/%61?%61"), "/a?%61");
        assert_eq!(refused(b"?x"), "path_not_origin_form");
    }

    #[test]
    fn other_escapes_are_kept_with_upper_case_hex() {
        assert_eq!(canon("/a%3fb"), "/a%3Fb");
        assert_eq!(canon("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(canon("/a%20b"), "/a%20b");
        assert_eq!(canon("/%2561dmin"), "/%2561dmin", "decoded once, never twice");
        assert_eq!(canon("/a%7Eb%2D%5F"), "/a~b-_");
    }

    #[test]
    fn ambiguous_encodings_are_refused_with_a_reason() {
        assert_eq!(refused(b"/admin%2Fx"), "path_encoded_slash");
        assert_eq!(refused(b"/x%2f..%2fadmin"), "path_encoded_slash");
        assert_eq!(refused(b"/admin%5cx"), "path_encoded_backslash");
        assert_eq!(refused(b"/admin\\x"), "path_backslash");
        assert_eq!(refused(b"/..\\admin"), "path_backslash");
        assert_eq!(refused(b"/admin%00.json"), "path_nul");
        assert_eq!(refused(b"/admin\0"), "path_nul");
        assert_eq!(refused(b"/admin%0d%0aX:1"), "path_encoded_control");
        assert_eq!(refused(b"/admin%7f"), "path_encoded_control");
        assert_eq!(refused(b"/a%"), "path_bad_escape");
        assert_eq!(refused(b"/a%4"), "path_bad_escape");
        assert_eq!(refused(b"/a%zz"), "path_bad_escape");
        assert_eq!(refused(b"/a%%41"), "path_bad_escape");
        assert_eq!(refused("/caf\u{e9}".as_bytes()), "path_bad_byte");
        assert_eq!(refused(b"/a b"), "path_bad_byte");
        assert_eq!(refused(b"/a\tb"), "path_bad_byte");
        assert_eq!(refused(b"/a#frag"), "path_bad_byte");
        assert_eq!(refused(b"/a?q=\x01"), "path_bad_byte", "the query's bytes are checked too");
        assert_eq!(refused(b"admin/x"), "path_not_origin_form");
        assert_eq!(refused(b"http://evil/admin"), "path_not_origin_form");
        assert_eq!(refused(b""), "path_not_origin_form");
        assert_eq!(refused(&vec![b'/'; MAX_PATH_BYTES + 1]), "path_too_long");
    }

    #[test]
    fn the_asterisk_form_is_kept() {
        assert_eq!(canon("*"), "*");
        assert_eq!(refused(b"*x"), "path_not_origin_form");
    }

    #[test]
    fn canonical_paths_are_fixed_points() {
        for raw in ["//admin/x", "/%61dmin/x/", "/a/../b/./c//", "/caf%c3%a9?q", "/..", "/a%3fb", "*"] {
            let once = canon(raw);
            assert_eq!(canon(&once), once, "{raw}");
        }
    }

    #[test]
    fn every_byte_sequence_is_answered_without_panicking() {
        // A cheap exhaustive sweep over short inputs of the bytes that matter.
        let alphabet = b"/.%2eEfF5cC0a\\?";
        let mut buf = Vec::new();
        for n in 0..=5u32 {
            for mut k in 0..(alphabet.len() as u64).pow(n) {
                buf.clear();
                for _ in 0..n {
                    buf.push(alphabet[(k % alphabet.len() as u64) as usize]);
                    k /= alphabet.len() as u64;
                }
                if let Ok(c) = canonicalize(&buf) {
                    assert!(c.path.starts_with('/') || c.path == "*");
                    assert!(!c.path.contains("//") && !c.path.contains("/./") && !c.path.contains("/../"), "{c:?}");
                    assert!(c.target().len() <= buf.len().max(1), "{c:?}");
                    assert_eq!(canonicalize(c.target().as_bytes()).as_ref(), Ok(&c), "not a fixed point");
                }
            }
        }
    }
}
