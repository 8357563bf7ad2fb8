//! Line shapes: the lines of one export are nearly all written by the same code, so they
//! differ only in the text of their string values and in their numbers. A [`Shape`] is a line
//! the scanner has read in full, with those values cut out as holes: the keys, brackets,
//! commas, spaces, `true`/`false`/`null` and the kind of every number are kept as they are.
//!
//! A later line has the shape when its bytes are the shape's, hole for hole, and every hole
//! holds a plain string or a number of the kind the shape had there. Such a line reads, token
//! for token, as the line the shape was learnt from: the same members in the same order, at
//! the same depths, each value of the same JSON type. So it is valid where that line was, a
//! serde struct takes it where it took that line, and a scanner walking it reads each field
//! from the hole at the same place. Matching a shape costs a compare per run of fixed bytes
//! and a bit scan per string, with no key to recognise and no grammar to follow.
//!
//! Only clean lines (no `\` and no control character, see [`Scanner::new`]) take part: in
//! them a string runs plainly from one quote to the next, so a string hole is found by the
//! quote map alone. Numbers in holes are kept to [`MAX_NUMBER`] characters without an
//! exponent, and a hole whose number had no fraction takes only integers, unless the caller
//! knows its scanner reads the line as well with a fraction there ([`Shape::learn`]):
//! an `i64` field never meets a fraction, and no `f64` can be out of range.

use super::scan::Scanner;

/// A hole no field is read from.
pub const NO_SLOT: u8 = u8::MAX;

/// The longest number a hole takes: an `i64` field's number surely fits.
pub const MAX_NUMBER: usize = 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    /// The text of a string, between its quotes.
    Str,
    /// An integer.
    Int,
    /// A number, with or without a fraction.
    Num,
    /// No bytes: where a value whose whole JSON text is read starts.
    Open,
    /// No bytes: where that value ends.
    Close,
    /// The end of the line.
    End,
}

/// Fixed bytes (up to `lit_end` in [`Shape::lits`]), then a hole.
#[derive(Debug, Clone, Copy)]
struct Seg {
    lit_end: u32,
    hole: Hole,
    /// Which of the caller's fields the hole fills ([`NO_SLOT`]: none).
    slot: u8,
}

#[derive(Debug, Clone)]
pub struct Shape {
    /// Every run of fixed bytes, one after the other.
    lits: Vec<u8>,
    segs: Vec<Seg>,
    /// How many `"` a line of this shape holds: lines are told apart by it before any compare.
    quotes: u32,
}

impl Shape {
    /// The shape of the line `s` scans, which the scanner must have read in full and accepted.
    /// `slot_of(start, end)` names the field read from bytes `start..end` of the line (a
    /// string's text, or a number), or [`NO_SLOT`]. `raw` holds the values read as their whole
    /// JSON text, as `(start, end, slot)` in the order of the line, none inside another. None:
    /// the line is not clean, holds a number no hole takes, or a value of `raw` starts or ends
    /// inside a string or a number.
    ///
    /// An integer of the line whose end is at `end` makes a hole that takes fractions too
    /// when `takes_fraction(end)`: when the caller's scanner would read the line as well with
    /// a fraction there (a lab value, which some lines of an export write as `301` and others
    /// as `10.5`). Else lines of one shape would make two, and the line whose number has a
    /// fraction would first be matched, nearly to its end, against the one without.
    pub fn learn(
        s: &Scanner<'_>,
        raw: &[(usize, usize, u8)],
        mut slot_of: impl FnMut(usize, usize) -> u8,
        mut takes_fraction: impl FnMut(usize) -> bool,
    ) -> Option<Shape> {
        if !s.is_clean() {
            return None;
        }
        let b = s.text().as_bytes();
        let mut lits = Vec::with_capacity(b.len() / 2);
        let mut segs = Vec::new();
        // The raw values' ends, in order: (position, Open or Close, slot).
        let mut marks = raw
            .iter()
            .flat_map(|&(start, end, slot)| [(start, Hole::Open, slot), (end, Hole::Close, slot)])
            .peekable();
        let mut i = 0;
        loop {
            while let Some(&(at, hole, slot)) = marks.peek() {
                if at > i {
                    break;
                }
                if at < i {
                    return None; // inside a token
                }
                segs.push(Seg {
                    lit_end: lits.len() as u32,
                    hole,
                    slot,
                });
                marks.next();
            }
            let Some(&c) = b.get(i) else { break };
            match c {
                b'"' => {
                    let close = s.next_quote(i + 1);
                    if close >= b.len() {
                        return None;
                    }
                    let after = close + 1 + b[close + 1..].iter().take_while(|c| c.is_ascii_whitespace()).count();
                    if b.get(after) == Some(&b':') {
                        // A key: it is the shape.
                        lits.extend_from_slice(&b[i..=close]);
                    } else {
                        lits.push(b'"');
                        segs.push(Seg {
                            lit_end: lits.len() as u32,
                            hole: Hole::Str,
                            slot: slot_of(i + 1, close),
                        });
                        lits.push(b'"');
                    }
                    i = close + 1;
                }
                b'-' | b'0'..=b'9' => {
                    let n = b[i..]
                        .iter()
                        .take_while(|c| matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'));
                    let end = i + n.count();
                    let number = &b[i..end];
                    if number.len() > MAX_NUMBER || number.iter().any(|c| matches!(c, b'e' | b'E' | b'+')) {
                        return None;
                    }
                    let hole = if number.contains(&b'.') || takes_fraction(end) {
                        Hole::Num
                    } else {
                        Hole::Int
                    };
                    segs.push(Seg {
                        lit_end: lits.len() as u32,
                        hole,
                        slot: slot_of(i, end),
                    });
                    i = end;
                }
                _ => {
                    lits.push(c);
                    i += 1;
                }
            }
        }
        if marks.next().is_some() {
            return None;
        }
        segs.push(Seg {
            lit_end: lits.len() as u32,
            hole: Hole::End,
            slot: NO_SLOT,
        });
        Some(Shape {
            lits,
            segs,
            quotes: s.quote_count(),
        })
    }

    /// How many `"` a line of this shape holds.
    #[inline]
    pub fn quotes(&self) -> u32 {
        self.quotes
    }

    /// Whether the line `s` scans has this shape. As it goes, each hole's text is handed to
    /// `put` with the hole's slot (holes of [`NO_SLOT`] are not): on `false`, what was handed
    /// over must be dropped.
    #[inline]
    pub fn matches<'a>(&self, s: &Scanner<'a>, mut put: impl FnMut(u8, &'a str)) -> bool {
        if !s.is_clean() {
            return false;
        }
        let text = s.text();
        let b = text.as_bytes();
        let (mut pos, mut from, mut open) = (0, 0, 0);
        for seg in &self.segs {
            let to = seg.lit_end as usize;
            if !same(b, pos, &self.lits[from..to]) {
                return false;
            }
            pos += to - from;
            from = to;
            let start = pos;
            match seg.hole {
                Hole::Str => {
                    pos = s.next_quote(pos);
                    if pos >= b.len() {
                        return false;
                    }
                }
                Hole::Int | Hole::Num => {
                    pos = number_end(b, pos, seg.hole == Hole::Num);
                    if pos == start || pos - start > MAX_NUMBER {
                        return false;
                    }
                }
                Hole::Open => {
                    open = pos;
                    continue;
                }
                Hole::Close => {
                    // SAFETY: `open` and `pos` are where a value starts and ends, next to
                    // ASCII bytes: character boundaries of `text`.
                    put(seg.slot, unsafe { text.get_unchecked(open..pos) });
                    continue;
                }
                Hole::End => return pos == b.len(),
            }
            if seg.slot != NO_SLOT {
                // SAFETY: `start` follows an ASCII quote or starts a number; `pos` is at a
                // quote or just past a digit: both are character boundaries of `text`.
                put(seg.slot, unsafe { text.get_unchecked(start..pos) });
            }
        }
        false
    }
}

/// Whether `b` holds `lit` at `pos`. Runs of fixed bytes are short (keys with their quotes
/// and punctuation, about 22 bytes on average): compared 16 bytes at a time, the last 16
/// overlapping the ones before, in line rather than through a call to `memcmp`.
#[inline(always)]
fn same(b: &[u8], pos: usize, lit: &[u8]) -> bool {
    let n = lit.len();
    let Some(got) = b.get(pos..pos + n) else { return false };
    if n >= 16 {
        let mut i = 0;
        while i + 16 < n {
            if !same16(&got[i..], &lit[i..]) {
                return false;
            }
            i += 16;
        }
        same16(&got[n - 16..], &lit[n - 16..])
    } else if n >= 8 {
        let word = |x: &[u8], at: usize| u64::from_le_bytes(x[at..at + 8].try_into().unwrap_or([0; 8]));
        word(got, 0) == word(lit, 0) && word(got, n - 8) == word(lit, n - 8)
    } else if n >= 4 {
        let half = |x: &[u8], at: usize| u32::from_le_bytes(x[at..at + 4].try_into().unwrap_or([0; 4]));
        half(got, 0) == half(lit, 0) && half(got, n - 4) == half(lit, n - 4)
    } else {
        // 0 to 3 bytes: the first, middle and last cover them all.
        n == 0 || (got[0] == lit[0] && got[n / 2] == lit[n / 2] && got[n - 1] == lit[n - 1])
    }
}

/// Whether `a` and `b` are the same bytes, compared in line as runs of fixed bytes are: for
/// short strings looked up on every line (codes, systems), without a call to `memcmp`.
#[inline(always)]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && same(a, 0, b)
}

/// Whether the first 16 bytes of `a` and `b` are the same (both hold at least 16).
#[inline(always)]
fn same16(a: &[u8], b: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8};
        assert!(a.len() >= 16 && b.len() >= 16);
        // SAFETY: both slices hold at least 16 bytes (asserted); SSE2 is part of x86_64;
        // unaligned loads.
        unsafe {
            let x = _mm_loadu_si128(a.as_ptr().cast::<__m128i>());
            let y = _mm_loadu_si128(b.as_ptr().cast::<__m128i>());
            _mm_movemask_epi8(_mm_cmpeq_epi8(x, y)) == 0xffff
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        a[..16] == b[..16]
    }
}

/// The end of the JSON number at `i` (`i` itself when there is none): an integer, or with
/// `fraction` also one with a fraction. No exponent: a hole never takes one.
#[inline]
fn number_end(b: &[u8], i: usize, fraction: bool) -> usize {
    let digits = |from: usize| from + b[from.min(b.len())..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut j = i;
    if b.get(j) == Some(&b'-') {
        j += 1;
    }
    match b.get(j) {
        Some(b'0') => j += 1,
        Some(b'1'..=b'9') => j = digits(j + 1),
        _ => return i,
    }
    if fraction && b.get(j) == Some(&b'.') {
        let end = digits(j + 1);
        if end == j + 1 {
            return i;
        }
        j = end;
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The holes of `line` when it has the shape of `learnt_from`, by slot (every hole's
    /// start is its slot here).
    fn holes(learnt_from: &str, line: &str) -> Option<Vec<(u8, String)>> {
        let shape = Shape::learn(&Scanner::new(learnt_from), &[], |start, _| start as u8, |_| false).expect("clean test line");
        let mut got = Vec::new();
        shape
            .matches(&Scanner::new(line), |slot, t| got.push((slot, t.to_string())))
            .then_some(got)
    }

    #[test]
    fn a_line_has_the_shape_it_was_learnt_from() {
        let line = r#"{"a":"x","b":[1,2.5,true,null],"c":{"d":-0.25}}"#;
        let got = holes(line, line).expect("matches itself");
        let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(texts, ["x", "1", "2.5", "-0.25"]);
    }

    #[test]
    fn values_may_change_and_nothing_else() {
        let learnt = r#"{"a":"x","n":12,"f":1.5,"t":true}"#;
        for ok in [r#"{"a":"","n":0,"f":3,"t":true}"#, r#"{"a":"é ü","n":-999,"f":-0.125,"t":true}"#] {
            assert!(holes(learnt, ok).is_some(), "{ok}");
        }
        for bad in [
            r#"{"a":"x","n":1.5,"f":1.5,"t":true}"#,                 // a fraction where an integer was
            r#"{"a":"x","n":1e5,"f":1.5,"t":true}"#,                 // an exponent
            r#"{"a":"x","n":01,"f":1.5,"t":true}"#,                  // not a JSON number
            r#"{"a":"x","n":-,"f":1.5,"t":true}"#,                   // not a JSON number
            r#"{"a":"x","n":1,"f":1.,"t":true}"#,                    // not a JSON number
            r#"{"a":null,"n":12,"f":1.5,"t":true}"#,                 // null where a string was
            r#"{"a":"x","n":12,"f":1.5,"t":false}"#,                 // another literal
            r#"{"b":"x","n":12,"f":1.5,"t":true}"#,                  // another key
            r#"{"a" :"x","n":12,"f":1.5,"t":true}"#,                 // other spacing
            r#"{"a":"x","n":12,"f":1.5,"t":true} "#,                 // more after the end
            r#"{"a":"x","n":12,"f":1.5,"t":true"#,                   // cut short
            r#"{"a":"x"","n":12,"f":1.5,"t":true}"#,                 // a quote too many
            r#"{"a":"x\n","n":12,"f":1.5,"t":true}"#,                // an escape: not clean
            r#"{"a":"x","n":1234567890123456789,"f":1.5,"t":true}"#, // too long
        ] {
            assert!(holes(learnt, bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_raw_value_is_cut_where_it_starts_and_ends() {
        let learnt = r#"{"a":"x","r":[{"v":1}],"s":"y"}"#;
        let start = learnt.find('[').expect("test line");
        let end = learnt.find(']').expect("test line") + 1;
        let shape = Shape::learn(&Scanner::new(learnt), &[(start, end, 7)], |_, _| NO_SLOT, |_| false).expect("clean test line");
        let mut got = Vec::new();
        let line = r#"{"a":"zz","r":[{"v":22}],"s":""}"#;
        assert!(shape.matches(&Scanner::new(line), |slot, t| got.push((slot, t))));
        assert_eq!(got, [(7, r#"[{"v":22}]"#)]);
        // A raw value cannot start inside a string.
        assert!(Shape::learn(&Scanner::new(learnt), &[(start + 3, end, 7)], |_, _| NO_SLOT, |_| false).is_none());
    }

    #[test]
    fn lines_it_cannot_take_have_no_shape() {
        for line in [r#"{"a":"\u0041"}"#, r#"{"n":1e3}"#, r#"{"n":12345678901234567890}"#] {
            assert!(
                Shape::learn(&Scanner::new(line), &[], |_, _| NO_SLOT, |_| false).is_none(),
                "{line}"
            );
        }
    }
}
