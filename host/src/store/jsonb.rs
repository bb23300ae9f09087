//! What PostgreSQL's `jsonb` refuses although JSON allows it.
//!
//! Event payloads and metadata are stored as `jsonb`, which refuses three things valid
//! JSON may hold: U+0000 in a string, an unpaired UTF-16 surrogate escape, and a number
//! outside `numeric`'s range. One such event in a group-commit batch would fail the
//! whole batch's transaction, so they are caught before the committer sees them: at
//! the API for commands (a 400 saying what to remove) and after every plugin call for
//! the events it decided.
//!
//! `jsonb` also prints a number back with every digit: `1e300` is stored in a few bytes
//! and read back as 301 characters, so a small event can come back from the database
//! thousands of times larger than it went in. [`check`] says by how much, and the
//! runtime and the executor hold an event's size to what it is read back as: that is
//! what every reader of the feed, and the relay, has to carry.

/// Why `jsonb` would refuse a JSON text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unstorable {
    /// `\u0000` in a string.
    #[error("a string holds U+0000 (`\\u0000`), which PostgreSQL cannot store")]
    Nul,
    /// A `\uD800`–`\uDFFF` escape that is not half of a pair.
    #[error("a string holds an unpaired surrogate escape `\\u{0:04x}`, which is not a character")]
    LoneSurrogate(u16),
    /// A number with more digits than `numeric` holds.
    #[error(
        "the number `{0}` is out of PostgreSQL's range (at most 131072 digits before the decimal point and 16383 after)"
    )]
    NumberOutOfRange(String),
    /// Arrays and objects nested deeper than [`MAX_DEPTH`].
    #[error(
        "arrays and objects are nested more than {MAX_DEPTH} deep, more than PostgreSQL's jsonb parser is given room for"
    )]
    TooDeep,
}

/// Deepest nesting of arrays and objects accepted. PostgreSQL parses `jsonb`
/// recursively and stops at its stack limit (about 10,000 levels with the default
/// `max_stack_depth` of 2 MB) with an error that is no data exception; met inside a
/// group commit it failed the whole batch as an outage, on every retry. JSON a person
/// or program means to write stays far below this.
pub const MAX_DEPTH: usize = 1_000;

/// Most digits `numeric` holds before the decimal point.
const MAX_DIGITS_BEFORE_POINT: i64 = 131_072;

/// Most digits `numeric` holds after the decimal point.
const MAX_DIGITS_AFTER_POINT: i64 = 16_383;

/// Checks a text that is already known to be valid JSON. Returns at most how many bytes
/// longer PostgreSQL prints it than `json` is (whitespace aside): what numbers written
/// with an exponent gain when printed in full. Strings never grow (`jsonb` prints
/// escapes such as `\u00e9` as the character), so numbers are the only cause.
pub fn check(json: &str) -> Result<usize, Unstorable> {
    let bytes = json.as_bytes();
    let mut growth = 0usize;
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        i = match bytes[i] {
            b'"' => string_end(bytes, i + 1)?,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Unstorable::TooDeep);
                }
                i + 1
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i + 1
            }
            b'-' | b'0'..=b'9' => {
                let (end, printed) = number_end(json, i)?;
                growth = growth.saturating_add(printed.saturating_sub(end - i));
                end
            }
            _ => i + 1,
        };
    }
    Ok(growth)
}

/// Scans a string body from just after its opening quote; returns the index just past
/// its closing quote.
fn string_end(bytes: &[u8], mut i: usize) -> Result<usize, Unstorable> {
    // A high surrogate escape waiting for the low one that must follow it at once.
    let mut high: Option<u16> = None;
    while i < bytes.len() {
        let unit = match (bytes[i], bytes.get(i + 1)) {
            (b'\\', Some(b'u')) => bytes
                .get(i + 2..i + 6)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok()),
            _ => None,
        };
        match unit {
            Some(0xDC00..=0xDFFF) if high.is_some() => high = None,
            Some(unit) => {
                if let Some(high) = high {
                    return Err(Unstorable::LoneSurrogate(high));
                }
                match unit {
                    0 => return Err(Unstorable::Nul),
                    0xD800..=0xDBFF => high = Some(unit),
                    0xDC00..=0xDFFF => return Err(Unstorable::LoneSurrogate(unit)),
                    _ => {}
                }
            }
            None => {
                if let Some(high) = high {
                    return Err(Unstorable::LoneSurrogate(high));
                }
            }
        }
        i += match (unit, bytes[i]) {
            (Some(_), _) => 6,
            (None, b'\\') => 2,
            (None, b'"') => return Ok(i + 1),
            (None, _) => 1,
        };
    }
    Ok(i)
}

/// Scans a number from its first character; returns the index just past it and at most
/// how many characters `numeric` prints it as.
fn number_end(json: &str, start: usize) -> Result<(usize, usize), Unstorable> {
    let bytes = json.as_bytes();
    let digits = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let int_start = if bytes[start] == b'-' {
        start + 1
    } else {
        start
    };
    let int_end = digits(int_start);
    // Leading zeros take no digit of `numeric`.
    let int_digits = bytes[int_start..int_end]
        .iter()
        .skip_while(|&&d| d == b'0')
        .count() as i64;
    let mut end = int_end;
    let mut frac_digits = 0;
    // Zeros ahead of the first significant digit, across the point.
    let mut leading_zeros = (int_end - int_start) as i64 - int_digits;
    let mut all_zero = int_digits == 0;
    if bytes.get(end) == Some(&b'.') {
        let frac_end = digits(end + 1);
        frac_digits = (frac_end - end - 1) as i64;
        if all_zero {
            let zeros = bytes[end + 1..frac_end]
                .iter()
                .take_while(|&&d| d == b'0')
                .count() as i64;
            leading_zeros += zeros;
            all_zero = zeros == frac_digits;
        }
        end = frac_end;
    }
    let mut exponent: i64 = 0;
    if matches!(bytes.get(end), Some(b'e' | b'E')) {
        end += 1;
        let negative = bytes.get(end) == Some(&b'-');
        if matches!(bytes.get(end), Some(b'-' | b'+')) {
            end += 1;
        }
        let exp_end = digits(end);
        for &d in &bytes[end..exp_end] {
            exponent = exponent
                .saturating_mul(10)
                .saturating_add(i64::from(d - b'0'));
        }
        if negative {
            exponent = -exponent;
        }
        end = exp_end;
    }
    if int_digits.saturating_add(exponent) > MAX_DIGITS_BEFORE_POINT
        || frac_digits.saturating_sub(exponent) > MAX_DIGITS_AFTER_POINT
    {
        let text = &json[start..end];
        let shown = match text.char_indices().nth(24) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.to_string(),
        };
        return Err(Unstorable::NumberOutOfRange(shown));
    }
    // `numeric` keeps the scale written (`dscale`: the digits after the point, less the
    // exponent) and prints the integer part without leading zeros, at least `0`. Both
    // are within the range checked above, so this cannot overflow.
    let point = (int_end - int_start) as i64 + exponent;
    let int_len = if all_zero {
        1
    } else {
        (point - leading_zeros).max(1)
    };
    let scale = (frac_digits - exponent).max(0);
    let sign = i64::from(bytes[start] == b'-');
    let printed = sign + int_len + if scale > 0 { 1 + scale } else { 0 };
    Ok((end, printed as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_held_to_max_depth_brackets_in_strings_aside() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(check(&nested(MAX_DEPTH)).is_ok());
        assert_eq!(check(&nested(MAX_DEPTH + 1)), Err(Unstorable::TooDeep));
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(check(&objects), Err(Unstorable::TooDeep));
        // Side by side, not nested; and brackets inside strings are text.
        let wide = format!("[{}]", vec!["[[]]"; 5 * MAX_DEPTH].join(","));
        assert!(check(&wide).is_ok());
        let quoted = format!(r#"["{}"]"#, "[".repeat(2 * MAX_DEPTH));
        assert!(check(&quoted).is_ok());
    }

    #[test]
    fn what_jsonb_stores_passes() {
        for ok in [
            r#"{"owner":"alice","balance":5,"open":true,"x":null}"#,
            r#"{"smile":"\ud83d\ude00","tab":"\t","escaped":"\\u0000","quote":"\"\\"}"#,
            r#"[-0.5e-16382, 1e131071, 1e-16383, 0.0001e131072, 123456789012345678901234567890]"#,
            r#"{"\u0001":"\u00e9\u2028"}"#,
            "\"ends in a backslash pair \\\\\"",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn numbers_are_printed_with_every_digit() {
        // What PostgreSQL 15 prints for each (`SELECT '<n>'::jsonb`, checked with psql;
        // the end-to-end test `unstorable` checks many more against the server).
        for (written, printed) in [
            ("1e5", "100000"),
            ("1E+5", "100000"),
            ("-12.5e3", "-12500"),
            ("123e-5", "0.00123"),
            ("0.001e2", "0.1"),
            ("0e5", "0"),
            ("0.000e-2", "0.00000"),
            ("1.50", "1.50"),
        ] {
            assert_eq!(
                check(written),
                Ok(printed.len().saturating_sub(written.len())),
                "{written}"
            );
        }
        assert_eq!(check(r#"{"a":[1e300,2,"1e300"]}"#), Ok(296));
        assert_eq!(check(r#"{"a":"x"}"#), Ok(0));
    }

    #[test]
    fn what_jsonb_refuses_is_named() {
        // Each of these PostgreSQL 15 refuses as `jsonb` (checked with psql).
        assert_eq!(check(r#"{"a":"x\u0000y"}"#), Err(Unstorable::Nul));
        assert_eq!(check(r#"{"a\u0000":1}"#), Err(Unstorable::Nul));
        assert_eq!(
            check(r#"["\ud800"]"#),
            Err(Unstorable::LoneSurrogate(0xd800))
        );
        assert_eq!(
            check(r#"["\ud800x"]"#),
            Err(Unstorable::LoneSurrogate(0xd800))
        );
        assert_eq!(
            check(r#"["\ude00\ud83d"]"#),
            Err(Unstorable::LoneSurrogate(0xde00))
        );
        assert_eq!(
            check(r#"["\ud83d\ud83d\ude00"]"#),
            Err(Unstorable::LoneSurrogate(0xd83d))
        );
        for number in [
            "1e131072",
            "10e131071",
            "0.5e-16383",
            "-1e-16384",
            "1e99999999999999999999999",
        ] {
            assert!(
                matches!(
                    check(&format!("[{number}]")),
                    Err(Unstorable::NumberOutOfRange(_))
                ),
                "{number}"
            );
        }
    }
}
