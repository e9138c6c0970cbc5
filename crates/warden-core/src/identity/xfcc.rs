//! `x-forwarded-client-cert` (Envoy's format): elements separated by `,`, each a list of
//! `key=value` pairs separated by `;`, values optionally double-quoted (and then may hold
//! `,` `;` `=` and `\"`). Each hop appends its own element, so the last one describes the
//! client of the hop right before us.

/// The `URI` of the last element, if it has one.
pub fn last_uri(header: &str) -> Option<String> {
    let elements = split_unquoted(header, ',');
    let last = elements.last()?;
    for pair in split_unquoted(last, ';') {
        if let Some((k, v)) = pair.split_once('=') {
            if k.trim().eq_ignore_ascii_case("uri") {
                return Some(unquote(v.trim()));
            }
        }
    }
    None
}

fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\""),
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_uri_of_the_last_hop() {
        let h = r#"By=spiffe://a/x;Hash=aa;URI=spiffe://a/first,By=spiffe://a/y;Hash=bb;Subject="CN=x,O=y";URI=spiffe://a/second"#;
        assert_eq!(last_uri(h).as_deref(), Some("spiffe://a/second"));
    }

    #[test]
    fn no_uri_or_garbage_gives_none() {
        assert_eq!(last_uri("Hash=aa"), None);
        assert_eq!(last_uri(""), None);
        assert_eq!(last_uri(r#"URI="unterminated"#).as_deref(), Some("\"unterminated"));
    }
}
