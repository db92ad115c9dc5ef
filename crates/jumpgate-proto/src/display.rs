//! Making text from the other side safe to log or write to a file.
//!
//! Anything a peer sends (a relay's public host, a refusal's detail, a service name echoed back, a
//! decoder error quoting the bytes it choked on) may hold newlines that forge log lines, ANSI
//! escapes that rewrite a terminal, bidirectional overrides that reorder what an operator reads, or
//! 60 KB of filler. [`sanitize`] bounds the length and escapes all of those, so a line logged by
//! one side is one line, written by that side, whatever the other side sent.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest relay- or agent-supplied field (a host, a name, a refusal detail) that is logged or
/// written to a status file: a DNS name is at most 253 bytes, and a reason longer than this is
/// filler.
pub const MAX_FIELD_LEN: usize = 256;

/// Longest whole message that quotes a peer (an error that embeds a decoder's complaint about a
/// frame, for example): room for several fields plus our own wording.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Whether `c` must not reach a log line or file as is: control characters (C0, DEL, C1: newline,
/// carriage return, escape...), Unicode line and paragraph separators, bidirectional controls and
/// invisible format characters that make displayed text differ from the bytes.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// Appends `c`, escaped if it must be: `\n`, `\r`, `\t`, else `\u{XX}` in hex.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Bytes `c` takes once escaped.
fn escaped_len(c: char) -> usize {
    match c {
        '\n' | '\r' | '\t' => 2,
        c if needs_escape(c) => {
            let digits = (32 - u32::from(c).leading_zeros()).div_ceil(4).max(1) as usize;
            4 + digits
        }
        c => c.len_utf8(),
    }
}

/// `value`'s text made safe for one log line or audit field ([`sanitize`] at
/// [`MAX_FIELD_LEN`]): for errors and reasons whose text can quote what a peer sent.
pub fn shown(value: &dyn std::fmt::Display) -> String {
    sanitize(&value.to_string(), MAX_FIELD_LEN).into_owned()
}

/// `input` made safe to log or write to a file: control and invisible characters escaped (so the
/// result holds none), and at most `max` bytes long. Cut text ends with `...[N bytes]`, N being
/// the original length, so an operator can tell a 60 KB echo from a long reason. Printable input
/// within `max` is returned unchanged (and unallocated). Backslashes are kept as they are, so a
/// literal `\n` in the input reads the same as an escaped newline: ambiguous to the eye, but
/// never a second line.
pub fn sanitize(input: &str, max: usize) -> Cow<'_, str> {
    if input.len() <= max && !input.chars().any(needs_escape) {
        return Cow::Borrowed(input);
    }
    let mut total = 0usize;
    let fits = input.chars().all(|c| {
        total += escaped_len(c);
        total <= max
    });
    let marker = format!("...[{} bytes]", input.len());
    let (budget, marker) = match (fits, marker.len() <= max) {
        (true, _) => (max, ""),
        (false, true) => (max - marker.len(), marker.as_str()),
        (false, false) => (max, ""),
    };
    let mut out = String::with_capacity(budget.min(input.len().saturating_mul(2)) + marker.len());
    for c in input.chars() {
        if out.len() + escaped_len(c) > budget {
            break;
        }
        push_escaped(&mut out, c);
    }
    out.push_str(marker);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn printable_text_is_untouched() {
        let s = "relay.example.com";
        assert!(matches!(sanitize(s, 256), Cow::Borrowed(_)));
        assert_eq!(sanitize("", 0), "");
        assert_eq!(
            sanitize("ünïcødé ✓ back\\slash \"q\"", 256),
            "ünïcødé ✓ back\\slash \"q\""
        );
    }

    #[test]
    fn log_injection_is_escaped() {
        assert_eq!(
            sanitize("ok\nERROR forged line\r\x1b[2J\t\u{7f}", 256),
            "ok\\nERROR forged line\\r\\u{1b}[2J\\t\\u{7f}"
        );
        assert_eq!(
            sanitize("a\u{202E}b\u{2028}c", 256),
            "a\\u{202e}b\\u{2028}c"
        );
        assert_eq!(sanitize("\u{85}\u{9b}", 256), "\\u{85}\\u{9b}");
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        let echo = "A".repeat(60_000);
        let out = sanitize(&echo, MAX_FIELD_LEN);
        assert_eq!(out.len(), MAX_FIELD_LEN);
        assert!(out.ends_with("...[60000 bytes]"), "{out}");
        assert!(out.starts_with("AAAA"));
        // An escape is never cut in half.
        let newlines = "\n".repeat(100);
        assert_eq!(sanitize(&newlines, 20), "\\n\\n\\n...[100 bytes]");
        assert_eq!(sanitize(&newlines, 19), "\\n\\n...[100 bytes]");
        // A limit too small for the marker still holds.
        assert_eq!(sanitize("abcdef", 3), "abc");
        assert_eq!(sanitize("\n\n", 3), "\\n");
    }

    #[test]
    fn escaped_len_matches_push_escaped() {
        for c in [
            'a', 'é', '✓', '😀', '\n', '\0', '\u{1b}', '\u{7f}', '\u{9f}', '\u{202e}', '\u{feff}',
        ] {
            let mut s = String::new();
            push_escaped(&mut s, c);
            assert_eq!(s.len(), escaped_len(c), "{c:?} -> {s}");
        }
    }

    proptest! {
        #[test]
        fn output_is_bounded_and_has_no_control_chars(s in any::<String>(), max in 0usize..300) {
            let out = sanitize(&s, max);
            prop_assert!(out.len() <= max, "{} > {max}", out.len());
            prop_assert!(!out.chars().any(needs_escape), "{out:?}");
            prop_assert!(!out.contains('\n'));
        }

        #[test]
        fn printable_ascii_within_the_limit_is_unchanged(s in "[ -~]{0,256}") {
            prop_assert_eq!(sanitize(&s, MAX_FIELD_LEN), s.as_str());
        }

        #[test]
        fn cut_output_is_a_prefix_of_the_full_escape(s in any::<String>(), max in 20usize..200) {
            let full = sanitize(&s, usize::MAX).into_owned();
            let out = sanitize(&s, max);
            match out.rfind("...[") {
                Some(at) if full.len() > max => prop_assert!(full.starts_with(&out[..at])),
                _ => prop_assert_eq!(&*out, full.as_str()),
            }
        }
    }
}
