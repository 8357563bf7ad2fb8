//! Dates and instants as trialgate compares them.
//!
//! Every time is reduced to a UTC instant (seconds since 1970-01-01T00:00:00Z) before it is
//! compared, so that `2026-06-01T23:30:00-02:00` and `2026-06-02T01:30:00Z` are the same moment.
//! A FHIR `date` stands for midnight UTC of that day. Partial dates (`2019`, `2019-04`) and
//! unparsable strings are *unusable*: callers treat them as missing, never as a guess.
//! Look-back windows include both end days: "within 90 days of D" is
//! `[D - 90 days 00:00Z, D + 1 day 00:00Z)`. Written without chrono: the calendar arithmetic
//! needed here is a few lines and keeps the build light.

use std::fmt;

pub const SECS_PER_DAY: i64 = 86_400;

/// A calendar day (proleptic Gregorian), stored as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Date(i64);

/// A UTC instant in whole seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Instant(pub i64);

impl Date {
    pub fn from_ymd(y: i64, m: u32, d: u32) -> Option<Date> {
        if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        Some(Date(days_from_civil(y, m, d)))
    }

    /// Parses exactly `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Date> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let y = two(b, 0)? * 100 + two(b, 2)?;
        Date::from_ymd(y, two(b, 5)? as u32, two(b, 8)? as u32)
    }

    pub fn ymd(self) -> (i64, u32, u32) {
        civil_from_days(self.0)
    }

    /// Days since 1970-01-01, as [`Date::from_days`] takes them back.
    pub fn days(self) -> i64 {
        self.0
    }

    pub fn from_days(days: i64) -> Date {
        Date(days)
    }

    pub fn start(self) -> Instant {
        Instant(self.0 * SECS_PER_DAY)
    }

    /// The first instant after this day (exclusive end of the day).
    pub fn end(self) -> Instant {
        Instant((self.0 + 1) * SECS_PER_DAY)
    }

    pub fn add_days(self, n: i64) -> Date {
        Date(self.0 + n)
    }

    /// Calendar month arithmetic; the day is clamped to the target month's length.
    pub fn add_months(self, n: i64) -> Date {
        let (y, m, d) = self.ymd();
        let total = y * 12 + (m as i64 - 1) + n;
        let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
        let nd = d.min(days_in_month(ny, nm));
        Date(days_from_civil(ny, nm, nd))
    }

    /// Completed years from `birth` to `self`.
    pub fn years_since(self, birth: Date) -> i64 {
        let (y, m, d) = self.ymd();
        let (by, bm, bd) = birth.ymd();
        y - by - i64::from((m, d) < (bm, bd))
    }

    /// Today in UTC, from the system clock. Only the binary's edge calls this: the evaluator
    /// always receives its screening date as an argument.
    pub fn today_utc() -> Date {
        Instant::now().date()
    }
}

impl Instant {
    /// Now, from the system clock. Like `Date::today_utc`, only for the edges (the daemon,
    /// the state's run times), never the evaluator.
    pub fn now() -> Instant {
        Instant(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        )
    }

    pub fn date(self) -> Date {
        Date(self.0.div_euclid(SECS_PER_DAY))
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.rem_euclid(SECS_PER_DAY);
        if secs == 0 {
            write!(f, "{}", self.date())
        } else {
            let (h, mi, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
            write!(f, "{}T{h:02}:{mi:02}:{s:02}Z", self.date())
        }
    }
}

/// Parses a FHIR `date`, `dateTime` or `instant` into a UTC instant.
/// Returns `None` for partial dates and anything unparsable.
pub fn parse_fhir_instant(s: &str) -> Option<Instant> {
    let s = crate::fhir::trim(s);
    if s.len() == 10 {
        return Date::parse(s).map(Date::start);
    }
    if s.len() < 19 || s.as_bytes()[10] != b'T' {
        return None;
    }
    let date = Date::parse(&s[..10])?;
    let b = s.as_bytes();
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (two(b, 11)?, two(b, 14)?, two(b, 17)?);
    // FHIR allows a leap second of 60.
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "" | "Z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' || !(ob[0] == b'+' || ob[0] == b'-') {
                return None;
            }
            let (oh, om) = (two(ob, 1)?, two(ob, 4)?);
            if oh > 14 || om > 59 {
                return None;
            }
            let sign = if ob[0] == b'-' { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
    };
    Some(Instant(date.start().0 + h * 3600 + mi * 60 + sec - offset))
}

/// A FHIR `date`/`dateTime` as the half-open range of instants it may mean: one second for
/// a full date or time (a date stands for its 00:00:00Z instant, as everywhere else here),
/// the whole year or month for a partial date (`2010`, `2010-04`). A partial date cannot
/// place an event inside a window, but it can prove that it happened long before one.
pub fn parse_fhir_range(s: &str) -> Option<(Instant, Instant)> {
    if let Some(t) = parse_fhir_instant(s) {
        return Some((t, Instant(t.0 + 1)));
    }
    let s = crate::fhir::trim(s);
    let b = s.as_bytes();
    // Both arms below hold the year's four bytes first.
    let year = || Some(two(b, 0)? * 100 + two(b, 2)?);
    match b.len() {
        4 => {
            let y = year()?;
            Some((Date::from_ymd(y, 1, 1)?.start(), Date::from_ymd(y + 1, 1, 1)?.start()))
        }
        7 if b[4] == b'-' => {
            let y = year()?;
            let m = two(b, 5)? as u32;
            let first = Date::from_ymd(y, m, 1)?;
            Some((first.start(), first.add_months(1).start()))
        }
        _ => None,
    }
}

/// A length of time as written in trial files: `90d`, `12w`, `3mo`, `2y`.
/// Months and years are calendar months and years counted back from the screening date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Days(i64),
    Weeks(i64),
    Months(i64),
    Years(i64),
}

impl Span {
    pub fn parse(s: &str) -> Option<Span> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit())?;
        let (num, unit) = s.split_at(split);
        // Bounded so that calendar arithmetic can never overflow (no listing looks back
        // further than a few decades).
        let n: i64 = num.parse().ok().filter(|n| *n <= 100_000)?;
        match unit.trim() {
            "d" | "day" | "days" => Some(Span::Days(n)),
            "w" | "wk" | "week" | "weeks" => Some(Span::Weeks(n)),
            "mo" | "month" | "months" => Some(Span::Months(n)),
            "y" | "year" | "years" => Some(Span::Years(n)),
            _ => None,
        }
    }

    /// The day `self` before `d`.
    pub fn before(self, d: Date) -> Date {
        match self {
            Span::Days(n) => d.add_days(-n),
            Span::Weeks(n) => d.add_days(-7 * n),
            Span::Months(n) => d.add_months(-n),
            Span::Years(n) => d.add_months(-12 * n),
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (n, unit) = match *self {
            Span::Days(n) => (n, "day"),
            Span::Weeks(n) => (n, "week"),
            Span::Months(n) => (n, "month"),
            Span::Years(n) => (n, "year"),
        };
        write!(f, "{n} {unit}{}", if n == 1 { "" } else { "s" })
    }
}

/// A half-open interval of instants `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    /// The days `span` before `as_of` up to and including `as_of`.
    pub fn lookback(span: Span, as_of: Date) -> Window {
        Window {
            start: span.before(as_of).start(),
            end: as_of.end(),
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        self.start <= t && t < self.end
    }

    /// Whether `[a, b]` (b = None: still going) overlaps this window.
    pub fn overlaps(&self, a: Instant, b: Option<Instant>) -> bool {
        a < self.end && b.is_none_or(|b| b >= self.start)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} to {}", self.start.date(), Instant(self.end.0 - 1).date())
    }
}

/// The two ASCII digits at `b[i..i + 2]` as a number. Every time of every Observation is
/// read through here: a digit loop per field made parsing a time cost about 230 instructions.
#[inline]
fn two(b: &[u8], i: usize) -> Option<i64> {
    let (hi, lo) = (b[i].wrapping_sub(b'0'), b[i + 1].wrapping_sub(b'0'));
    (hi < 10 && lo < 10).then(|| i64::from(hi) * 10 + i64::from(lo))
}

fn is_leap(y: i64) -> bool {
    // `rem_euclid` by a power of two is a mask; the other two only matter on a multiple of 4.
    y.rem_euclid(4) == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    const DAYS: [u8; 13] = [0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    match DAYS.get(m as usize) {
        Some(28) if is_leap(y) => 29,
        Some(&n) => u32::from(n),
        None => 0,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    // The years written with four digits, in unsigned arithmetic: its divisions by constants
    // are a multiply each, without the sign corrections (every Observation's time is here).
    if let Ok(y @ 1..=9999) = u64::try_from(y) {
        let y = y - u64::from(m <= 2);
        let (era, m) = (y / 400, u64::from(m));
        let yoe = y - era * 400;
        let doy = (153 * ((m + 9) % 12) + 2) / 5 + u64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        return (era * 146_097 + doe) as i64 - 719_468;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // From 0000-03-01 on (every date a record holds), in unsigned arithmetic, as in
    // `days_from_civil`: look-back windows and ages take this way for every patient.
    if let Ok(z @ 0..=3_000_000) = u64::try_from(z + 719_468) {
        let era = z / 146_097;
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = (yoe + era * 400) as i64;
        return (if m <= 2 { y + 1 } else { y }, m, d);
    }
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        Date::parse(s).unwrap()
    }

    #[test]
    fn instants_compare_in_utc() {
        let a = parse_fhir_instant("2026-06-01T23:30:00-02:00").unwrap();
        let b = parse_fhir_instant("2026-06-02T01:30:00Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_fhir_instant("2026-03-03").unwrap(), d("2026-03-03").start());
        assert_eq!(
            parse_fhir_instant("2026-05-10T08:00:00.123+05:30").unwrap().0,
            d("2026-05-10").start().0 + 8 * 3600 - 5 * 3600 - 1800
        );
    }

    #[test]
    fn partial_and_garbage_dates_are_unusable() {
        for s in [
            "2019",
            "2019-04",
            "2019-02-30",
            "2026-06-01T25:00:00Z",
            "yesterday",
            "2026-06-01T10:00Z",
        ] {
            assert_eq!(parse_fhir_instant(s), None, "{s}");
        }
    }

    #[test]
    fn windows_include_both_end_days() {
        let w = Window::lookback(Span::Days(90), d("2026-06-01"));
        assert!(w.contains(parse_fhir_instant("2026-03-03T00:00:00Z").unwrap()));
        assert!(!w.contains(parse_fhir_instant("2026-03-02T23:59:59Z").unwrap()));
        assert!(w.contains(parse_fhir_instant("2026-03-02T23:30:00-01:00").unwrap()));
        assert!(w.contains(parse_fhir_instant("2026-06-01T23:59:59Z").unwrap()));
        assert!(!w.contains(parse_fhir_instant("2026-06-01T23:30:00-02:00").unwrap()));
        let w180 = Window::lookback(Span::Days(180), d("2026-06-01"));
        assert_eq!(w180.start, d("2025-12-03").start());
    }

    #[test]
    fn calendar_months_and_years_clamp() {
        assert_eq!(Span::Months(3).before(d("2026-05-31")), d("2026-02-28"));
        assert_eq!(Span::Years(2).before(d("2024-02-29")), d("2022-02-28"));
        assert_eq!(Span::Weeks(12).before(d("2026-06-01")), d("2026-03-09"));
    }

    #[test]
    fn completed_years() {
        let asof = d("2026-06-01");
        assert_eq!(asof.years_since(d("2008-06-01")), 18);
        assert_eq!(asof.years_since(d("2008-06-02")), 17);
        assert_eq!(asof.years_since(d("1950-06-01")), 76);
    }

    #[test]
    fn four_digit_years_count_days_as_the_general_formula() {
        // The signed formula, as it stood before four-digit years took a way of their own.
        let general = |y: i64, m: u32, d: u32| {
            let y = if m <= 2 { y - 1 } else { y };
            let era = y.div_euclid(400);
            let yoe = y - era * 400;
            let m = i64::from(m);
            let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
            era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
        };
        for y in (1..=9999)
            .step_by(7)
            .chain([1, 4, 100, 400, 1600, 1900, 1970, 2000, 2024, 2100, 9999])
        {
            for m in 1..=12 {
                for d in [1, 28, days_in_month(y, m)] {
                    assert_eq!(days_from_civil(y, m, d), general(y, m, d), "{y}-{m}-{d}");
                    assert_eq!(civil_from_days(days_from_civil(y, m, d)), (y, m, d));
                }
            }
        }
        assert_eq!(d("1970-01-01").0, 0);
        assert_eq!(d("2000-03-01").0, 11_017);
        assert_eq!(Date::from_ymd(2023, 2, 29), None);
        assert_eq!(Date::from_ymd(2024, 2, 29).map(|x| x.0), Some(19_782));
    }

    #[test]
    fn days_read_back_as_the_general_formula_gives() {
        // The signed formula, as it stood before days from year 0 on took a way of their own.
        let general = |z: i64| {
            let z = z + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let (d, m) = ((doy - (153 * mp + 2) / 5 + 1) as u32, if mp < 10 { mp + 3 } else { mp - 9 } as u32);
            let y = yoe + era * 400;
            (if m <= 2 { y + 1 } else { y }, m, d)
        };
        // Both ends of the unsigned way, and every day of four centuries around the epoch.
        let edges = [
            -719_469,
            -719_468,
            -719_467,
            3_000_000 - 719_468,
            3_000_001 - 719_468,
            -10_000_000,
            10_000_000,
        ];
        for z in (-80_000..80_000).chain(edges) {
            assert_eq!(civil_from_days(z), general(z), "day {z}");
        }
        for y in [-4, -1, 0, 1, 4, 100, 200, 400, 1900, 2000, 2023, 2024, 2100] {
            let general = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            assert_eq!(is_leap(y), general, "{y}");
        }
    }

    #[test]
    fn spans_parse() {
        assert_eq!(Span::parse("90d"), Some(Span::Days(90)));
        assert_eq!(Span::parse("3mo"), Some(Span::Months(3)));
        assert_eq!(Span::parse("2 y"), Some(Span::Years(2)));
        assert_eq!(Span::parse("3m"), None);
        assert_eq!(Span::parse("9999999999999999y"), None);
    }

    #[test]
    fn partial_dates_are_ranges() {
        assert_eq!(parse_fhir_range("2010"), Some((d("2010-01-01").start(), d("2011-01-01").start())));
        assert_eq!(
            parse_fhir_range("2010-12"),
            Some((d("2010-12-01").start(), d("2011-01-01").start()))
        );
        let t = parse_fhir_instant("2026-03-03").unwrap();
        assert_eq!(parse_fhir_range("2026-03-03"), Some((t, Instant(t.0 + 1))));
        assert_eq!(parse_fhir_range("2010-13"), None);
        assert_eq!(parse_fhir_range("20x0"), None);
    }
}
