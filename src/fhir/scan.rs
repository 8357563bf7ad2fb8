//! A validating JSON scanner for the hot NDJSON lines: it checks a whole line against the JSON
//! grammar as fast as the bytes can be walked and hands back, borrowed, the few fields the
//! caller asks for, without building anything.
//!
//! It is only ever a shortcut. Whenever it meets something it is not sure it reads exactly as
//! serde_json and the `fhir::model` structs would (an escape in a key or in a string it
//! captures, a declared field twice, a declared field of a type it does not take, `null`
//! where serde rejects it, a number that could be out of range, nesting deeper than 100), it
//! gives up with [`Bail`] and the caller parses the line with serde as before, so every
//! verdict and every reported input problem is what the full parse gives. It never accepts a
//! line serde_json rejects: grammar, control characters in strings, escapes, number syntax
//! and trailing characters are all checked.

/// "Not sure: take the full parse."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bail;

pub type R<T> = Result<T, Bail>;

/// The JSON type a declared field of a `fhir::model` struct takes, for checking fields the
/// caller does not read (serde would reject the line if their type were wrong).
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// `Option<String>` (or a `String` element of a Vec).
    Str,
    /// `Option<f64>`.
    F64,
    /// `Option<i64>`.
    I64,
    /// `Option<bool>`.
    Bool,
    /// `Option<struct>` (or a struct element of a Vec).
    Obj(&'static [Field]),
}

/// A declared field: its JSON name, type, and whether it is a `#[serde(default)] Vec<T>`
/// (which takes an array, never `null`) rather than an `Option<T>`.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub ty: Ty,
    pub vec: bool,
}

const fn f(name: &'static str, ty: Ty) -> Field {
    Field { name, ty, vec: false }
}
const fn v(name: &'static str, ty: Ty) -> Field {
    Field { name, ty, vec: true }
}

/// `fhir::model` shapes, field for field (keep in step with model.rs).
pub const CODING: &[Field] = &[f("system", Ty::Str), f("code", Ty::Str), f("display", Ty::Str)];
pub const CODEABLE_CONCEPT: &[Field] = &[v("coding", Ty::Obj(CODING)), f("text", Ty::Str)];
pub const QUANTITY: &[Field] = &[
    f("value", Ty::F64),
    f("comparator", Ty::Str),
    f("unit", Ty::Str),
    f("system", Ty::Str),
    f("code", Ty::Str),
];
pub const RANGE: &[Field] = &[f("low", Ty::Obj(QUANTITY)), f("high", Ty::Obj(QUANTITY))];
pub const REFERENCE_RANGE: &[Field] = &[
    f("low", Ty::Obj(QUANTITY)),
    f("high", Ty::Obj(QUANTITY)),
    f("type", Ty::Obj(CODEABLE_CONCEPT)),
    v("appliesTo", Ty::Obj(CODEABLE_CONCEPT)),
    f("age", Ty::Obj(RANGE)),
    f("text", Ty::Str),
];
pub const COMPONENT: &[Field] = &[
    f("code", Ty::Obj(CODEABLE_CONCEPT)),
    f("valueQuantity", Ty::Obj(QUANTITY)),
    f("valueString", Ty::Str),
    f("valueInteger", Ty::I64),
    f("valueCodeableConcept", Ty::Obj(CODEABLE_CONCEPT)),
    v("referenceRange", Ty::Obj(REFERENCE_RANGE)),
];
pub const PERIOD: &[Field] = &[f("start", Ty::Str), f("end", Ty::Str)];
pub const REFERENCE: &[Field] = &[f("reference", Ty::Str)];

use std::mem::MaybeUninit;

const MAX_DEPTH: u32 = 100;

/// Lines up to this many bytes get a quote map (see [`Scanner::new`]); longer ones, rare,
/// are walked byte by byte.
const MAPPED: usize = 64 * 64;

pub struct Scanner<'a> {
    b: &'a [u8],
    s: &'a str,
    i: usize,
    depth: u32,
    /// Whether the line holds no `\` and no control character at all: then every string runs
    /// plainly to the next `"`, which `quotes` finds without walking the string's bytes.
    clean: bool,
    /// How many words of `quotes` are filled: those covering the line when `clean`, else 0.
    words: usize,
    /// How many `"` the line holds, when `clean`.
    quote_n: u32,
    /// Bit `i % 64` of word `i / 64`: byte `i` is a `"`. Left unfilled past `words`: zeroing
    /// the whole map cost as much as filling it, for the usual line of under 1 KB.
    quotes: [MaybeUninit<u64>; MAPPED / 64],
}

impl<'a> Scanner<'a> {
    /// Inlined so that the scanner (half a kilobyte) is built where it is used, not copied there.
    #[inline(always)]
    pub fn new(s: &'a str) -> Scanner<'a> {
        let mut scanner = Scanner::unmapped(s.as_bytes());
        scanner.map(Some(s));
        scanner
    }

    /// A scanner for the line `b`, to be used once [`Scanner::map`] has filled its map:
    /// `let mut s = Scanner::unmapped(b); s.map(None);` builds the map where the scanner
    /// lives. A scanner returned with its map filled was copied (the map is half a kilobyte)
    /// into the caller for every line, inlining notwithstanding; returned before, there is
    /// nothing to copy.
    #[inline(always)]
    pub fn unmapped(b: &'a [u8]) -> Scanner<'a> {
        Scanner {
            b,
            s: "",
            i: 0,
            depth: 0,
            clean: false,
            words: 0,
            quote_n: 0,
            quotes: [const { MaybeUninit::uninit() }; MAPPED / 64],
        }
    }

    /// Fills the map of a scanner made by [`Scanner::unmapped`]; `s` is the line's text, or
    /// None to check the bytes: a line that is not UTF-8 then reads as an empty line (one no
    /// scan accepts). The quote map tells on the way whether every byte is ASCII: then the
    /// line is surely UTF-8, and only lines with other bytes (or too long to map) are checked
    /// apart, not every byte of the input twice.
    #[inline(always)]
    pub fn map(&mut self, s: Option<&'a str>) {
        let scanner = self;
        let b = scanner.b;
        let mut ascii = false;
        if b.len() <= MAPPED {
            let (clean, high) = map_quotes(b, &mut scanner.quotes);
            ascii = !high;
            if let Some(n) = clean {
                scanner.clean = true;
                scanner.words = b.len().div_ceil(64);
                scanner.quote_n = n;
            }
        }
        scanner.s = match s {
            Some(s) => s,
            // SAFETY: every byte of `b` is below 0x80: `b` is ASCII, hence UTF-8.
            None if ascii => unsafe { std::str::from_utf8_unchecked(b) },
            None => match std::str::from_utf8(b) {
                Ok(s) => s,
                Err(_) => {
                    // As the scanner of an empty line.
                    (scanner.b, scanner.clean, scanner.words, scanner.quote_n) = (&[], true, 0, 0);
                    ""
                }
            },
        };
    }

    /// Whether the line is clean: no `\` and no control character, so every string in it
    /// runs plainly from a quote to the next (see [`crate::fhir::shape`]).
    #[inline(always)]
    pub(crate) fn is_clean(&self) -> bool {
        self.clean
    }

    /// The whole line.
    #[inline(always)]
    pub(crate) fn text(&self) -> &'a str {
        self.s
    }

    /// How many `"` a clean line holds (0 for any other).
    #[inline(always)]
    pub(crate) fn quote_count(&self) -> u32 {
        self.quote_n
    }

    /// On a clean line, the position of the first `"` at or after `from` (the line's length
    /// when there is none).
    #[inline(always)]
    pub(crate) fn next_quote(&self, from: usize) -> usize {
        self.string_stop(from)
    }

    /// Word `w` of the quote map, if it covers part of the line.
    #[inline(always)]
    fn quote_word(&self, w: usize) -> Option<u64> {
        if w < self.words {
            // SAFETY: `map_quotes` filled every word below `words`.
            Some(unsafe { self.quotes[w].assume_init() })
        } else {
            None
        }
    }

    #[inline(always)]
    fn peek(&self) -> u8 {
        self.b.get(self.i).copied().unwrap_or(0)
    }

    /// Skips JSON whitespace; one comparison in the usual case of none (every whitespace
    /// byte is at most a space).
    #[inline(always)]
    pub fn ws(&mut self) {
        if self.b.get(self.i).is_some_and(|&c| c > b' ') {
            return;
        }
        self.ws_slow();
    }

    #[inline(never)]
    fn ws_slow(&mut self) {
        while let Some(&c) = self.b.get(self.i) {
            if c == b' ' || c == b'\n' || c == b'\r' || c == b'\t' {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    #[inline(always)]
    fn eat(&mut self, c: u8) -> R<()> {
        if self.peek() == c {
            self.i += 1;
            Ok(())
        } else {
            Err(Bail)
        }
    }

    /// Whether an object starts here.
    pub fn peek_is_object(&self) -> bool {
        self.peek() == b'{'
    }

    /// After the whole value: only whitespace may follow.
    pub fn end(&mut self) -> R<()> {
        self.ws();
        if self.i == self.b.len() { Ok(()) } else { Err(Bail) }
    }

    /// The position of the next `"`, `\` or control character at or after `from`.
    #[inline(always)]
    fn string_stop(&self, from: usize) -> usize {
        if self.clean {
            // Only a quote can stop a string here: the next set bit of the map.
            let mut w = from / 64;
            let Some(first) = self.quote_word(w) else { return self.b.len() };
            let mut bits = first >> (from % 64) << (from % 64);
            loop {
                if bits != 0 {
                    return w * 64 + bits.trailing_zeros() as usize;
                }
                w += 1;
                match self.quote_word(w) {
                    Some(q) => bits = q,
                    None => return self.b.len(),
                }
            }
        }
        let b = self.b;
        let mut i = from;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            // SAFETY: SSE2 is part of x86_64; every load reads 16 bytes inside `b`.
            unsafe {
                let quote = _mm_set1_epi8(b'"' as i8);
                let slash = _mm_set1_epi8(b'\\' as i8);
                let ctl = _mm_set1_epi8(0x1f);
                while i + 16 <= b.len() {
                    let x = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
                    let m = _mm_or_si128(
                        _mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, slash)),
                        _mm_cmpeq_epi8(_mm_max_epu8(x, ctl), ctl),
                    );
                    let mask = _mm_movemask_epi8(m) as u32;
                    if mask != 0 {
                        return i + mask.trailing_zeros() as usize;
                    }
                    i += 16;
                }
            }
        }
        while i < b.len() {
            let c = b[i];
            if c == b'"' || c == b'\\' || c < 0x20 {
                return i;
            }
            i += 1;
        }
        i
    }

    /// A string (at its opening quote), checked as serde_json checks a string it skips.
    /// Returns its raw text and whether it holds an escape.
    #[inline(always)]
    pub fn string_raw(&mut self) -> R<(&'a str, bool)> {
        if self.clean {
            // No escape and no control character anywhere in the line: the string ends at
            // the next quote, and a line without one is cut short.
            if self.peek() != b'"' {
                return Err(Bail);
            }
            let start = self.i + 1;
            let end = self.string_stop(start);
            if end >= self.b.len() {
                return Err(Bail);
            }
            self.i = end + 1;
            // SAFETY: `start..end` lies inside `s` between two ASCII quotes, so both ends are
            // character boundaries.
            return Ok((unsafe { self.s.get_unchecked(start..end) }, false));
        }
        self.string_walked()
    }

    /// [`Scanner::string_raw`] on a line with escapes or control characters: walked.
    #[inline(never)]
    fn string_walked(&mut self) -> R<(&'a str, bool)> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        let mut i = start;
        loop {
            i = self.string_stop(i);
            match self.b.get(i) {
                Some(b'"') => {
                    self.i = i + 1;
                    // SAFETY: `start..i` lies inside `s` between two ASCII quotes, so both
                    // ends are character boundaries.
                    return Ok((unsafe { self.s.get_unchecked(start..i) }, escaped));
                }
                Some(b'\\') => {
                    escaped = true;
                    match self.b.get(i + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => i += 2,
                        Some(b'u') => {
                            let hex = self.b.get(i + 2..i + 6).ok_or(Bail)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return Err(Bail);
                            }
                            i += 6;
                        }
                        _ => return Err(Bail),
                    }
                }
                _ => return Err(Bail), // a control character, or the end of the line
            }
        }
    }

    /// A string the caller reads: one with an escape is left to serde (which unescapes it).
    #[inline]
    pub fn string(&mut self) -> R<&'a str> {
        match self.string_raw()? {
            (s, false) => Ok(s),
            (_, true) => Err(Bail),
        }
    }

    /// An object key and its colon.
    #[inline]
    fn key(&mut self) -> R<&'a str> {
        let k = self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Ok(k)
    }

    /// A JSON number, checked against the grammar, as its text.
    pub fn number(&mut self) -> R<&'a str> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        // The end of the digits from `i`, which must be at least one.
        let digits = |i: usize| {
            let end = i + b[i.min(b.len())..].iter().take_while(|c| c.is_ascii_digit()).count();
            if end == i { Err(Bail) } else { Ok(end) }
        };
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i)?,
            _ => return Err(Bail),
        }
        if b.get(i) == Some(&b'.') {
            i = digits(i + 1)?;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            i = digits(i)?;
        }
        self.i = i;
        Ok(&self.s[start..i])
    }

    fn literal(&mut self, word: &[u8]) -> R<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Bail)
        }
    }

    /// `null` (consumed) or not (nothing consumed).
    #[inline]
    pub fn null(&mut self) -> R<bool> {
        if self.peek() == b'n' {
            self.literal(b"null")?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// `true` or `false`.
    pub fn boolean(&mut self) -> R<bool> {
        match self.peek() {
            b't' => self.literal(b"true").map(|_| true),
            b'f' => self.literal(b"false").map(|_| false),
            _ => Err(Bail),
        }
    }

    /// Skips any value, checking it as serde_json checks a value it ignores. Containers are
    /// walked in one loop with a bit stack (no call per value): most of a line's bytes are in
    /// parts nobody reads.
    pub fn skip(&mut self) -> R<()> {
        match self.peek() {
            b'"' => return self.string_raw().map(drop),
            b'{' | b'[' => {}
            _ => return self.scalar(),
        }
        // Bit n of `stack`: whether the container at depth n is an object.
        let mut stack: u128 = 0;
        let mut depth: u32 = 0;
        let limit = MAX_DEPTH.saturating_sub(self.depth).min(127);
        'value: loop {
            // At a value.
            match self.peek() {
                b'"' => {
                    self.string_raw()?;
                }
                open @ (b'{' | b'[') => {
                    self.i += 1;
                    if depth == limit {
                        return Err(Bail);
                    }
                    let object = open == b'{';
                    stack = (stack << 1) | u128::from(object);
                    depth += 1;
                    self.ws();
                    let close = if object { b'}' } else { b']' };
                    if self.peek() == close {
                        self.i += 1;
                        stack >>= 1;
                        depth -= 1;
                    } else {
                        if object {
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                }
                _ => self.scalar()?,
            }
            // After a value: close containers until one goes on.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.peek() {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return Err(Bail),
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// A key inside a skipped object (serde ignores it, escapes and all) and its colon.
    #[inline]
    fn member_key(&mut self) -> R<()> {
        self.string_raw()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Ok(())
    }

    /// `true`, `false`, `null` or a number.
    #[inline]
    fn scalar(&mut self) -> R<()> {
        match self.peek() {
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(drop),
        }
    }

    /// Walks an object (at its `{`), calling `each` for every member with the scanner at the
    /// value, which `each` must consume.
    #[inline]
    pub fn object(&mut self, mut each: impl FnMut(&mut Self, &'a str) -> R<()>) -> R<()> {
        self.container(b'{', b'}', |s| {
            let k = s.key()?;
            each(s, k)
        })
    }

    /// Walks an array (at its `[`), calling `each` with the scanner at every element.
    #[inline]
    pub fn array(&mut self, each: impl FnMut(&mut Self) -> R<()>) -> R<()> {
        self.container(b'[', b']', each)
    }

    /// An object's or array's brackets, commas and depth, with `item` reading each member.
    #[inline(always)]
    fn container(&mut self, open: u8, close: u8, mut item: impl FnMut(&mut Self) -> R<()>) -> R<()> {
        self.eat(open)?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Bail);
        }
        self.ws();
        if self.peek() == close {
            self.i += 1;
            self.depth -= 1;
            return Ok(());
        }
        loop {
            item(self)?;
            self.ws();
            match self.peek() {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                c if c == close => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(());
                }
                _ => return Err(Bail),
            }
        }
    }

    /// The raw text of the value here, checked against `ty` (and skipped).
    pub fn raw_typed(&mut self, ty: Ty, vec: bool) -> R<&'a str> {
        self.raw_of(|s| s.typed(ty, vec))
    }

    /// The whole JSON text of the value here, read by `read` (which must read exactly it).
    pub fn raw_of(&mut self, read: impl FnOnce(&mut Self) -> R<()>) -> R<&'a str> {
        let start = self.i;
        read(self)?;
        Ok(&self.s[start..self.i])
    }

    /// Checks the value here as serde would deserialize a declared field of type `ty`
    /// (`Option<ty>`, or with `vec` a `#[serde(default)] Vec<ty>`), and skips it.
    pub fn typed(&mut self, ty: Ty, vec: bool) -> R<()> {
        if vec {
            return self.array(|s| s.typed_value(ty));
        }
        if self.null()? {
            return Ok(());
        }
        self.typed_value(ty)
    }

    fn typed_value(&mut self, ty: Ty) -> R<()> {
        match ty {
            Ty::Str => self.string().map(drop),
            Ty::F64 => self.f64_text().map(drop),
            Ty::I64 => {
                let n = self.number()?;
                // A plain integer that surely fits; anything else is serde's to judge.
                if n.len() > 18 || n.bytes().any(|c| !c.is_ascii_digit() && c != b'-') {
                    return Err(Bail);
                }
                Ok(())
            }
            Ty::Bool => match self.peek() {
                b't' => self.literal(b"true"),
                b'f' => self.literal(b"false"),
                _ => Err(Bail),
            },
            Ty::Obj(fields) => self.typed_object(fields),
        }
    }

    /// A number serde reads as an `f64` without error: no exponent, so never out of range.
    pub fn f64_text(&mut self) -> R<&'a str> {
        let n = self.number()?;
        if n.len() > 300 || n.bytes().any(|c| c == b'e' || c == b'E') {
            return Err(Bail);
        }
        Ok(n)
    }

    /// An object of the declared `fields`: each checked, none twice; others skipped.
    pub fn typed_object(&mut self, fields: &'static [Field]) -> R<()> {
        let mut seen = 0u64;
        self.object(|s, k| match fields.iter().position(|f| f.name == k) {
            Some(n) => {
                if seen & (1 << n) != 0 {
                    return Err(Bail);
                }
                seen |= 1 << n;
                s.typed(fields[n].ty, fields[n].vec)
            }
            None => s.skip(),
        })
    }
}

/// Fills `quotes` with where `b` (at most [`MAPPED`] bytes) has a `"`, and tells how many
/// when `b` is free of `\` and control characters (None otherwise). One pass of vector
/// compares: the line's strings are then found by bit scans, not by a loop that leaves at an
/// unpredictable byte per string.
fn map_quotes(b: &[u8], quotes: &mut [MaybeUninit<u64>; MAPPED / 64]) -> (Option<u32>, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has AVX2 and POPCNT, checked just above (std caches the answer).
        return unsafe { map_quotes_avx2(b, quotes) };
    }
    fill_quotes(b, quotes, classify)
}

/// [`map_quotes`] 32 bytes to a compare, where the CPU can: half the work of 16 (and the
/// quotes counted by one instruction a word). Whether a byte is dirty or not ASCII is
/// gathered in two vectors over the whole line and looked at once; the last, partial word
/// is read as the line's last 64 bytes (bytes already seen, which change neither answer)
/// and shifted, rather than copied into a padded block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn map_quotes_avx2(b: &[u8], quotes: &mut [MaybeUninit<u64>; MAPPED / 64]) -> (Option<u32>, bool) {
    use std::arch::x86_64::*;
    if b.len() < 64 {
        // The closure runs with this function's AVX2.
        return fill_quotes(b, quotes, |block| classify_avx2(block));
    }
    let (mut bad, mut all) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let full = b.len() / 64;
    let mut n = 0;
    for (w, word) in quotes.iter_mut().enumerate().take(full) {
        // SAFETY: `64 * w + 64 <= b.len()`.
        let q = unsafe { quotes_at(b.as_ptr().add(64 * w), &mut bad, &mut all) };
        *word = MaybeUninit::new(q);
        n += q.count_ones();
    }
    let rest = b.len() % 64;
    if rest > 0 {
        // SAFETY: `b.len() >= 64`: the last 64 bytes are inside `b`.
        let q = unsafe { quotes_at(b.as_ptr().add(b.len() - 64), &mut bad, &mut all) } >> (64 - rest);
        quotes[full] = MaybeUninit::new(q);
        n += q.count_ones();
    }
    // A byte of 0x80 or more has its top bit set: the mask takes the top bits.
    let dirty = _mm256_movemask_epi8(bad) != 0;
    ((!dirty).then_some(n), _mm256_movemask_epi8(all) != 0)
}

/// The `"` bits of the 64 bytes at `p`; ORs into `bad` where they are `\` or below 0x20,
/// and into `all` the bytes themselves.
///
/// # Safety
/// The CPU has AVX2, and the 64 bytes at `p` are readable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn quotes_at(p: *const u8, bad: &mut std::arch::x86_64::__m256i, all: &mut std::arch::x86_64::__m256i) -> u64 {
    use std::arch::x86_64::*;
    let quote = _mm256_set1_epi8(b'"' as i8);
    let slash = _mm256_set1_epi8(b'\\' as i8);
    let ctl = _mm256_set1_epi8(0x1f);
    let mut q = 0u64;
    for k in 0..2 {
        // SAFETY: the caller's 64 bytes.
        let x = unsafe { _mm256_loadu_si256(p.add(32 * k) as *const __m256i) };
        q |= u64::from(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, quote)) as u32) << (32 * k);
        let d = _mm256_or_si256(_mm256_cmpeq_epi8(x, slash), _mm256_cmpeq_epi8(_mm256_max_epu8(x, ctl), ctl));
        *bad = _mm256_or_si256(*bad, d);
        *all = _mm256_or_si256(*all, x);
    }
    q
}

#[inline(always)]
fn fill_quotes(
    b: &[u8],
    quotes: &mut [MaybeUninit<u64>; MAPPED / 64],
    classify: impl Fn(&[u8; 64]) -> (u64, bool, bool),
) -> (Option<u32>, bool) {
    let (mut dirty, mut high) = (false, false);
    let mut n = 0;
    for (w, chunk) in b.chunks(64).enumerate() {
        let (q, d, h) = match <&[u8; 64]>::try_from(chunk) {
            Ok(full) => classify(full),
            Err(_) => {
                // The tail, padded with spaces (neither a quote, nor dirty, nor high).
                let mut block = [b' '; 64];
                block[..chunk.len()].copy_from_slice(chunk);
                classify(&block)
            }
        };
        quotes[w] = MaybeUninit::new(q);
        n += q.count_ones();
        dirty |= d;
        high |= h;
    }
    ((!dirty).then_some(n), high)
}

/// [`classify`] with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn classify_avx2(block: &[u8; 64]) -> (u64, bool, bool) {
    use std::arch::x86_64::*;
    let quote = _mm256_set1_epi8(b'"' as i8);
    let slash = _mm256_set1_epi8(b'\\' as i8);
    let ctl = _mm256_set1_epi8(0x1f);
    let mut q = 0u64;
    let mut bad = _mm256_setzero_si256();
    let mut all = _mm256_setzero_si256();
    for k in 0..2 {
        // SAFETY: the two loads read the 64 bytes of `block`.
        let x = unsafe { _mm256_loadu_si256(block.as_ptr().add(32 * k) as *const __m256i) };
        q |= u64::from(_mm256_movemask_epi8(_mm256_cmpeq_epi8(x, quote)) as u32) << (32 * k);
        let d = _mm256_or_si256(_mm256_cmpeq_epi8(x, slash), _mm256_cmpeq_epi8(_mm256_max_epu8(x, ctl), ctl));
        bad = _mm256_or_si256(bad, d);
        all = _mm256_or_si256(all, x);
    }
    // A byte of 0x80 or more has its top bit set: the mask takes the top bits.
    (q, _mm256_movemask_epi8(bad) != 0, _mm256_movemask_epi8(all) != 0)
}

/// The `"` bits of 64 bytes; whether any of them is `\` or below 0x20; whether any is 0x80
/// or more (not ASCII).
#[inline(always)]
fn classify(block: &[u8; 64]) -> (u64, bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86_64; the four loads read the 64 bytes of `block`.
        unsafe {
            let quote = _mm_set1_epi8(b'"' as i8);
            let slash = _mm_set1_epi8(b'\\' as i8);
            let ctl = _mm_set1_epi8(0x1f);
            let mut q = 0u64;
            let mut bad = _mm_setzero_si128();
            let mut all = _mm_setzero_si128();
            for k in 0..4 {
                let x = _mm_loadu_si128(block.as_ptr().add(16 * k) as *const __m128i);
                q |= u64::from(_mm_movemask_epi8(_mm_cmpeq_epi8(x, quote)) as u16) << (16 * k);
                let d = _mm_or_si128(_mm_cmpeq_epi8(x, slash), _mm_cmpeq_epi8(_mm_max_epu8(x, ctl), ctl));
                bad = _mm_or_si128(bad, d);
                all = _mm_or_si128(all, x);
            }
            (q, _mm_movemask_epi8(bad) != 0, _mm_movemask_epi8(all) != 0)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    classify_bytewise(block)
}

/// [`classify`] a byte at a time: the way without vectors, and the tests' reference.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn classify_bytewise(block: &[u8; 64]) -> (u64, bool, bool) {
    let mut q = 0u64;
    let (mut dirty, mut high) = (false, false);
    for (k, &c) in block.iter().enumerate() {
        q |= u64::from(c == b'"') << k;
        dirty |= c == b'\\' || c < 0x20;
        high |= c >= 0x80;
    }
    (q, dirty, high)
}

/// Every single-byte edit of the ASCII `line` at every position: the byte deleted, replaced
/// by each of `bytes`, and preceded by each of them. (Shared by the scanner's and the shapes'
/// tests.)
#[cfg(test)]
pub(crate) fn single_byte_edits(line: &str, bytes: &[u8]) -> Vec<String> {
    let mut cases = Vec::new();
    for at in 0..line.len() {
        let (head, tail) = line.split_at(at);
        cases.push(format!("{head}{}", &tail[1..]));
        for &b in bytes {
            let c = b as char;
            cases.push(format!("{head}{c}{}", &tail[1..]));
            cases.push(format!("{head}{c}{tail}"));
        }
    }
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(s: &str) -> bool {
        let mut sc = Scanner::new(s);
        sc.ws(); // the callers' lines are trimmed; serde takes leading whitespace too
        sc.skip().and_then(|_| sc.end()).is_ok()
    }

    #[test]
    fn agrees_with_serde_on_validity() {
        let cases = [
            r#"{"a":1}"#,
            r#"{"a":[1,2,{"b":null}],"c":"x\"y","d":true,"e":false}"#,
            r#"{"a":-0.5e+10}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12G4"}"#,
            r#"{"a":"\u00e9 é"}"#,
            "{\"a\":\"tab\tin\"}",
            r#"{"a":1} x"#,
            r#"{"a":1}  "#,
            r#"{"a" 1}"#,
            r#"{"a":tru}"#,
            r#"{"a":nul}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":[]}"#,
            r#"{}"#,
            r#"{"a":{}}"#,
            r#"{"a":"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":"0123456789abcdef0123456789abcdef\"0123456789abcdef"}"#,
            r#"{"a":{"b":[{"c":[[],{}]},[1,[2,[3]]]],"d":{}},"e":[{"f":null}]}"#,
            r#"{"a":{"b":[{"c":[[],{}]},[1,[2,[3]]]],"d":{}},"e":[{"f":null}}"#,
            r#"{"a":{"b" "c"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":{"\u0041":1}}"#,
            r#"{"a":{1:2}}"#,
            r#"{"a":[{]}"#,
            r#"{"a":[}"#,
            r#"{"a":{"b":1]}"#,
        ];
        check_against_serde(&cases);
    }

    /// Lines long enough that their strings cross the quote map's 64-byte words, and their
    /// quotes land on every position of a word: valid, cut short, with a stray quote, with a
    /// control character, and over the mapped length.
    #[test]
    fn quote_map_agrees_with_serde_across_words() {
        let mut cases = Vec::new();
        for pad in 0..140 {
            let filler = "x".repeat(pad);
            let line = format!(r#"{{"k{filler}":"v{filler}","a":[1,"{filler}",{{"b":"{filler}"}}],"z":"end"}}"#);
            cases.push(line.clone());
            cases.push(line[..line.len() - 7].to_string()); // cut inside the last string
            cases.push(line.replacen(&format!("v{filler}"), &format!("v{filler}\""), 1));
            cases.push(line.replacen(&format!("v{filler}"), &format!("v{filler}\u{1}"), 1));
            cases.push(line.replacen(&format!("v{filler}"), &format!("v{filler}\\n"), 1));
        }
        let long = "y".repeat(MAPPED);
        cases.push(format!(r#"{{"a":"{long}"}}"#));
        cases.push(format!(r#"{{"a":"{long}}}"#));
        let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
        check_against_serde(&cases);
    }

    fn check_against_serde(cases: &[&str]) {
        for &c in cases {
            let serde = serde_json::from_str::<serde::de::IgnoredAny>(c).is_ok();
            // The scanner may refuse more (it bails on doubt) but never accepts what serde rejects.
            if valid(c) {
                assert!(serde, "scanner accepted what serde rejects: {c}");
            }
            if serde && !c.contains("\\u") && !c.contains("\\\"") {
                assert!(valid(c), "scanner rejected valid JSON: {c}");
            }
        }
    }

    #[test]
    fn typed_fields_bail_on_wrong_types_and_duplicates() {
        let ok = |s: &str| Scanner::new(s).typed_object(CODEABLE_CONCEPT).is_ok();
        assert!(ok(r#"{"coding":[{"system":"s","code":"c"}],"text":"t","x":[1]}"#));
        assert!(!ok(r#"{"coding":null}"#));
        assert!(!ok(r#"{"coding":[null]}"#));
        assert!(!ok(r#"{"coding":[{"code":7}]}"#));
        assert!(!ok(r#"{"text":"a","text":"b"}"#));
        assert!(ok(r#"{"coding":[{"code":null}],"text":null}"#));
        let q = |s: &str| Scanner::new(s).typed_object(QUANTITY).is_ok();
        assert!(q(r#"{"value":1.5}"#));
        assert!(!q(r#"{"value":1e400}"#));
        assert!(!q(r#"{"value":"1"}"#));
    }

    /// Every single-byte edit of a real export line (deleted, replaced or preceded by a byte
    /// that matters to the grammar), at every position: the scanner never accepts what serde
    /// rejects, and accepts every valid result without escapes.
    #[test]
    fn single_byte_edits_of_a_real_line_agree_with_serde() {
        let line = r#"{"resourceType":"Observation","id":"3ea490ba","meta":{"lastUpdated":"2026-04-04T10:42:09Z"},"status":"amended","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory","display":"Laboratory"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"777-3","display":"Platelets [#/volume] in Blood by Automated count"}],"text":"Platelets"},"subject":{"reference":"Patient/8ddb0499"},"effectiveDateTime":"2026-04-04T00:42:09Z","valueQuantity":{"value":301.5,"unit":"10*9/L","code":"10*9/L"},"referenceRange":[{"low":{"value":-1e2},"high":{"value":450}}],"x":[true,false,null,[],{}]}"#;
        let cases = single_byte_edits(line, b"{}[]:,\" \t\\x0-.eEtnf");
        let cases: Vec<&str> = cases.iter().map(String::as_str).collect();
        check_against_serde(&cases);
    }

    /// A line taken as bytes reads as the same text taken as a string when it is UTF-8,
    /// ASCII or not, short or longer than the quote map; otherwise as an empty line.
    #[test]
    fn lines_as_bytes_read_as_text_when_utf8() {
        let long = format!(r#"{{"a":"{}","b":"é"}}"#, "x".repeat(MAPPED));
        for line in [r#"{"a":"x"}"#, r#"{"a":"Müller","b":"日本"}"#, long.as_str()] {
            let mut s = Scanner::unmapped(line.as_bytes());
            s.map(None);
            assert_eq!(s.text(), line);
            assert_eq!(s.is_clean(), Scanner::new(line).is_clean());
            assert!(s.skip().and_then(|_| s.end()).is_ok(), "{line}");
        }
        for bytes in [&b"{\"a\":\"M\xfcller\"}"[..], b"{\"a\":\"\xe6\x97\"}", b"{}\xff"] {
            let mut s = Scanner::unmapped(bytes);
            s.map(None);
            assert_eq!(s.text(), "");
            assert!(s.skip().is_err(), "{bytes:?}");
        }
    }

    /// The AVX2 map of a whole line agrees with the one built block by block, for lines of
    /// every length up to five words with a quote, a dirty byte or a non-ASCII byte at each
    /// place (the last word, read overlapping the one before, included).
    #[test]
    fn avx2_line_maps_agree_with_block_maps() {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
            let fill = |b: &[u8], avx2: bool| {
                let mut quotes = [const { MaybeUninit::uninit() }; MAPPED / 64];
                // SAFETY: the CPU has AVX2 and POPCNT, checked above.
                let (clean, high) = if avx2 {
                    unsafe { map_quotes_avx2(b, &mut quotes) }
                } else {
                    fill_quotes(b, &mut quotes, classify)
                };
                // SAFETY: both fill the words covering the line.
                let words: Vec<u64> = quotes[..b.len().div_ceil(64)].iter().map(|w| unsafe { w.assume_init() }).collect();
                (words, clean, high)
            };
            let mut checked = 0;
            for len in 0..=320usize {
                let base: Vec<u8> = (0..len).map(|i| if i % 5 == 2 { b'"' } else { b'a' + (i % 26) as u8 }).collect();
                let mut lines = vec![base.clone()];
                for at in (0..len).step_by(7).chain(len.checked_sub(1)) {
                    for byte in [b'"', b'\\', b'\n', 0x80, b'x'] {
                        let mut line = base.clone();
                        line[at] = byte;
                        lines.push(line);
                    }
                }
                for line in &lines {
                    assert_eq!(
                        fill(line, true),
                        fill(line, false),
                        "a line of {len} bytes: {:?}",
                        String::from_utf8_lossy(line)
                    );
                    checked += 1;
                }
            }
            assert!(checked > 5000);
        }
    }

    /// The vector ways of mapping quotes agree with a byte-by-byte one, on blocks holding
    /// every byte value at every position.
    #[test]
    fn quote_maps_agree_with_bytewise() {
        for value in 0..=255u8 {
            for at in 0..64 {
                let mut block = [b'a'; 64];
                block[at] = value;
                block[(at * 7 + 3) % 64] = b'"';
                let want = classify_bytewise(&block);
                assert_eq!(classify(&block), want, "byte {value:#x} at {at}");
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    assert_eq!(unsafe { classify_avx2(&block) }, want, "byte {value:#x} at {at}");
                }
            }
        }
    }
}
