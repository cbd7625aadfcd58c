//! A tiny scanner that pulls the `"seq"` and `"ts"` integers out of a JSON
//! message without parsing it.
//!
//! The per-message path of the generator must be cheap, so instead of a JSON
//! parser this looks for the byte patterns `"seq":` and `"ts":` (optionally
//! followed by whitespace) and reads the unsigned decimal integer after them.
//! The first occurrence of each key wins. Inside a JSON string a quote is
//! escaped (`\"`), so the unescaped pattern `"seq":` can only be a key; a
//! nested object with the same key that comes first would win, which the
//! benchmark messages never have.

/// The fields the generator cares about; `None` when absent or not an
/// unsigned integer that fits `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields {
    pub seq: Option<u64>,
    pub ts: Option<u64>,
}

/// Finds `"seq":<int>` and `"ts":<int>` in `msg`.
#[inline]
pub fn scan(msg: &[u8]) -> Fields {
    let mut out = Fields::default();
    let mut i = 0;
    let n = msg.len();
    while i < n {
        // Jump to the next quote.
        match msg[i..].iter().position(|&b| b == b'"') {
            Some(off) => i += off,
            None => break,
        }
        let rest = &msg[i + 1..];
        if out.seq.is_none() && rest.starts_with(b"seq\"") {
            if let Some(v) = int_after_colon(&rest[4..]) {
                out.seq = Some(v);
                if out.ts.is_some() {
                    break;
                }
            }
            i += 5;
            continue;
        }
        if out.ts.is_none() && rest.starts_with(b"ts\"") {
            if let Some(v) = int_after_colon(&rest[3..]) {
                out.ts = Some(v);
                if out.seq.is_some() {
                    break;
                }
            }
            i += 4;
            continue;
        }
        i += 1;
    }
    out
}

/// `s` starts right after a key's closing quote: accepts optional
/// whitespace, a colon, optional whitespace, then an unsigned integer.
#[inline]
fn int_after_colon(s: &[u8]) -> Option<u64> {
    let mut i = skip_ws(s, 0);
    if s.get(i) != Some(&b':') {
        return None;
    }
    i = skip_ws(s, i + 1);
    parse_u64(&s[i..])
}

#[inline]
fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\r' | b'\n') = s.get(i) {
        i += 1;
    }
    i
}

/// Parses the leading decimal digits of `s`. `None` if there are none, on
/// overflow, or if the number continues as a float (`.`, `e`, `E`).
#[inline]
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in s {
        match b {
            b'0'..=b'9' => {
                v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            }
            b'.' | b'e' | b'E' => return None,
            _ => break,
        }
    }
    (digits > 0).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(seq: Option<u64>, ts: Option<u64>) -> Fields {
        Fields { seq, ts }
    }

    #[test]
    fn typical_message() {
        let m = br#"{"seq":42,"ts":1700000000123456789,"pad":"xxxxxxxxxxxxxxxx"}"#;
        assert_eq!(scan(m), f(Some(42), Some(1_700_000_000_123_456_789)));
    }

    #[test]
    fn order_whitespace_and_envelope() {
        let m = br#"{ "channel": "bench", "data": { "pad": "xx", "ts" : 7 , "seq":	 9 } }"#;
        assert_eq!(scan(m), f(Some(9), Some(7)));
        let m = b"{\"ts\":\n5,\"seq\":\r\n6}";
        assert_eq!(scan(m), f(Some(6), Some(5)));
    }

    #[test]
    fn missing_or_malformed() {
        assert_eq!(scan(b""), f(None, None));
        assert_eq!(scan(b"hello"), f(None, None));
        assert_eq!(scan(br#"{"seq":1}"#), f(Some(1), None));
        assert_eq!(scan(br#"{"ts":2}"#), f(None, Some(2)));
        // Not integers.
        assert_eq!(scan(br#"{"seq":"1","ts":-3}"#), f(None, None));
        assert_eq!(scan(br#"{"seq":1.5,"ts":1e9}"#), f(None, None));
        // Overflow.
        assert_eq!(scan(br#"{"seq":18446744073709551616}"#), f(None, None));
        assert_eq!(
            scan(br#"{"seq":18446744073709551615}"#),
            f(Some(u64::MAX), None)
        );
        // Truncated right after the key / colon.
        assert_eq!(scan(br#"{"seq""#), f(None, None));
        assert_eq!(scan(br#"{"seq":"#), f(None, None));
        assert_eq!(scan(br#"{"ts"#), f(None, None));
    }

    #[test]
    fn similar_keys_are_not_confused() {
        let m = br#"{"seqno":1,"tsx":2,"xseq":3,"ts_ns":4,"seq":5,"ts":6}"#;
        assert_eq!(scan(m), f(Some(5), Some(6)));
        // A key-looking value inside a string is escaped and ignored.
        let m = br#"{"pad":"\"seq\":99 \"ts\":98","seq":1,"ts":2}"#;
        assert_eq!(scan(m), f(Some(1), Some(2)));
        // A string value "seq" followed by a colon elsewhere is not a key
        // followed by an integer.
        let m = br#"{"k":"seq","seq":3}"#;
        assert_eq!(scan(m), f(Some(3), None));
    }

    #[test]
    fn first_occurrence_wins() {
        assert_eq!(
            scan(br#"{"seq":1,"seq":2,"ts":3,"ts":4}"#),
            f(Some(1), Some(3))
        );
        // A malformed first occurrence does not hide a later valid one.
        assert_eq!(scan(br#"{"seq":"a","seq":2}"#), f(Some(2), None));
    }

    #[test]
    fn parse_u64_edges() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"123,"), Some(123));
        assert_eq!(parse_u64(b"123}"), Some(123));
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"12.0"), None);
    }
}
