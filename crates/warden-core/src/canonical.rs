//! The canonical JSON form hashes are taken over, so that how a record's JSON is written
//! (whitespace, key order, escapes, `1.0` or `1`, `1e2` or `100`) never changes its hash and any
//! change of a value always does.
//!
//! RFC 8785 (JCS): keys sorted by their UTF-16 code units, no whitespace, strings with only the
//! escapes JSON requires (`\"`, `\\`, `\b \f \n \r \t`, `\u00xx` for other controls), numbers
//! as ECMAScript prints them (`ryu-js`). One deliberate difference: an integer that serde_json
//! holds exactly (a `u64` or `i64`) is printed exactly, where JCS would first round it to a
//! double. Both print the same for every integer up to 2^53, which is every integer a record
//! carries in practice (steps, milliseconds); beyond it JCS would let two different integers
//! share one form, and then a changed value would not change the hash.
//!
//! Hand-written (60 lines) rather than a crate: the JCS crates (`serde_json_canonicalizer`,
//! `serde_jcs`) round integers to doubles, and turn on serde_json's `float_roundtrip` for every
//! crate linked with them, the proxy's filter included. Tested against RFC 8785's examples and
//! against `serde_json_canonicalizer` on values where the two must agree.

use serde_json::Value;

/// The canonical text of `v`.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    write(&mut out, v);
    out
}

/// The canonical text of JSON `text` (which must parse).
pub fn of_text(text: &str) -> Result<String, serde_json::Error> {
    Ok(to_string(&serde_json::from_str::<Value>(text)?))
}

fn write(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(f) = n.as_f64() {
                // JSON has no NaN or infinity, so serde_json never holds one.
                out.push_str(ryu_js::Buffer::new().format(f));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // JCS orders by UTF-16 code units, which differs from UTF-8 byte order above U+FFFF.
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(out, k);
                out.push(':');
                write(out, item);
            }
            out.push('}');
        }
    }
}

/// serde_json escapes exactly what JCS does (`"`, `\`, the short control escapes, `\u00xx` in
/// lowercase for the other controls) and writes every other character as it is.
fn write_str(out: &mut String, s: &str) {
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        // Serializing a str cannot fail; kept total without a panic.
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc8785_examples() {
        // RFC 8785 section 3.2.2 (the sample with its numbers, literals and string escapes).
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            of_text(input).unwrap(),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
        // Section 3.2.3: sorting by UTF-16 code units.
        let input = r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#;
        assert_eq!(
            of_text(input).unwrap(),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\
             \"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
    }

    #[test]
    fn rfc8785_number_serialization() {
        // Appendix B: IEEE 754 values and their ECMAScript form.
        for (bits, want) in [
            (0x0000000000000000u64, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x4415af1d78b58c3f, "99999999999999980000"),
            (0x4415af1d78b58c40, "100000000000000000000"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
        ] {
            assert_eq!(to_string(&json!(f64::from_bits(bits))), want, "{bits:x}");
        }
    }

    #[test]
    fn reformatting_never_changes_the_form_and_a_changed_value_always_does() {
        let a = of_text(r#"{"b": [1, 2.0, 1e2], "a": {"y": "\u00fc", "x": null}, "r": 0.35}"#).unwrap();
        let b = of_text("{\n  \"a\": {\"x\": null, \"y\": \"ü\"},\n  \"r\": 3.5e-1,\n  \"b\": [1.0, 2, 100]\n}").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, r#"{"a":{"x":null,"y":"ü"},"b":[1,2,100],"r":0.35}"#);
        assert_eq!(of_text(&a).unwrap(), a, "the canonical form is its own canonical form");
        for changed in [
            r#"{"b": [1, 2.0, 1e2], "a": {"y": "\u00fc", "x": null}, "r": 0.36}"#,
            r#"{"b": [2, 1, 100], "a": {"y": "ü", "x": null}, "r": 0.35}"#,
            r#"{"b": [1, 2, 100], "a": {"y": "ü"}, "r": 0.35}"#,
            r#"{"b": [1, 2, 100], "a": {"y": "u", "x": null}, "r": 0.35}"#,
            r#"{"b": [1, 2, 100], "a": {"y": "ü", "x": false}, "r": 0.35}"#,
        ] {
            assert_ne!(of_text(changed).unwrap(), a, "{changed}");
        }
    }

    #[test]
    fn integers_beyond_2_pow_53_stay_exact() {
        assert_eq!(of_text("9007199254740993").unwrap(), "9007199254740993");
        assert_ne!(of_text("9007199254740993").unwrap(), of_text("9007199254740992").unwrap());
        assert_eq!(of_text("-42").unwrap(), "-42");
        assert_eq!(of_text("18446744073709551615").unwrap(), "18446744073709551615");
    }

    #[test]
    fn agrees_with_a_jcs_crate_wherever_integers_fit_a_double() {
        let samples = [
            r#"{"z":1,"a":[true,false,null,"x\u0001\u001f\u007f\t"],"m":{"é":1.5,"e":-0.0,"E":1e-7}}"#,
            r#"[0.1,0.2,0.30000000000000004,123456789012345,1e21,1e-6,-5e-324,2.5e+300]"#,
            r#"{"session_id":"s","step":3,"risk":12.75,"at_ms":1733000000000,"reasons":["a","b"]}"#,
            r#""\ud83d\ude00 \u2028 \u00e9""#,
        ];
        for s in samples {
            let v: Value = serde_json::from_str(s).unwrap();
            assert_eq!(to_string(&v), serde_json_canonicalizer::to_string(&v).unwrap(), "{s}");
        }
    }
}
