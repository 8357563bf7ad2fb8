//! Cron schedules for `trialgate daemon`: the five classic fields (minute, hour, day of month,
//! month, day of week; UTC), each `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a
//! comma list of those. As in Vixie cron, when both day fields are restricted (neither starts
//! with `*`) a day matching either runs; otherwise a day must match both.

use crate::time::{Date, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    days_any: bool,
    weekdays_any: bool,
    text: String,
}

fn field(text: &str, lo: u32, hi: u32, name: &str) -> Result<(Vec<bool>, bool), String> {
    let mut set = vec![false; hi as usize + 1];
    let bad = |why: &str| format!("cron {name} `{text}`: {why}");
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| bad("the step must be a positive number"))?,
            ),
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let a = a.parse::<u32>().map_err(|_| bad("not a number"))?;
            let b = b.parse::<u32>().map_err(|_| bad("not a number"))?;
            (a, b)
        } else {
            let a = range.parse::<u32>().map_err(|_| bad("not a number"))?;
            // `5/15` means from 5 to the end in steps of 15.
            (a, if part.contains('/') { hi } else { a })
        };
        if a < lo || b > hi || a > b {
            return Err(bad(&format!("out of range {lo}-{hi}")));
        }
        for v in (a..=b).step_by(step as usize) {
            set[v as usize] = true;
        }
    }
    // Vixie cron's rule: a field that starts with `*` (`*`, `*/2`) does not restrict the day.
    Ok((set, text.starts_with('*')))
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 5 {
            return Err(format!(
                "cron `{text}`: give five fields, minute hour day-of-month month day-of-week (UTC), such as `0 2 * * *`"
            ));
        }
        let (minutes, _) = field(f[0], 0, 59, "minute")?;
        let (hours, _) = field(f[1], 0, 23, "hour")?;
        let (days, days_any) = field(f[2], 1, 31, "day of month")?;
        let (months, _) = field(f[3], 1, 12, "month")?;
        // 0 and 7 are both Sunday.
        let (mut weekdays, weekdays_any) = field(f[4], 0, 7, "day of week")?;
        if weekdays[7] {
            weekdays[0] = true;
        }
        Ok(Schedule {
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_any,
            weekdays_any,
            text: text.to_string(),
        })
    }

    fn day_matches(&self, d: Date) -> bool {
        let (_, m, day) = d.ymd();
        if !self.months[m as usize] {
            return false;
        }
        // 1970-01-01 was a Thursday (4).
        let weekday = ((d.start().0 / 86_400).rem_euclid(7) + 4) % 7;
        let by_day = self.days[day as usize];
        let by_weekday = self.weekdays[weekday as usize];
        if self.days_any || self.weekdays_any {
            by_day && by_weekday
        } else {
            by_day || by_weekday
        }
    }

    /// The first minute strictly after `t` the schedule fires, within the next eight years
    /// (a schedule such as `0 0 31 2 *` never fires: None).
    pub fn next_after(&self, t: Instant) -> Option<Instant> {
        let mut minute = t.0.div_euclid(60) + 1;
        let limit = minute + 8 * 366 * 24 * 60;
        while minute < limit {
            let day = Date::parse("1970-01-01")?.add_days(minute.div_euclid(1440));
            if !self.day_matches(day) {
                minute = (minute.div_euclid(1440) + 1) * 1440;
                continue;
            }
            let of_day = minute.rem_euclid(1440);
            let (h, m) = (of_day / 60, of_day % 60);
            if self.hours[h as usize] && self.minutes[m as usize] {
                return Some(Instant(minute * 60));
            }
            minute += 1;
        }
        None
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_fhir_instant;

    fn next(cron: &str, after: &str) -> String {
        let s = Schedule::parse(cron).unwrap();
        let t = s.next_after(parse_fhir_instant(after).unwrap()).unwrap();
        format!("{} {:02}:{:02}", t.date(), (t.0 / 3600).rem_euclid(24), (t.0 / 60).rem_euclid(60))
    }

    #[test]
    fn next_runs_follow_cron_rules() {
        assert_eq!(next("0 2 * * *", "2026-06-01T01:59:30Z"), "2026-06-01 02:00");
        assert_eq!(next("0 2 * * *", "2026-06-01T02:00:00Z"), "2026-06-02 02:00", "strictly after");
        assert_eq!(next("*/15 * * * *", "2026-06-01T10:07:00Z"), "2026-06-01 10:15");
        assert_eq!(
            next("30 6 * * 1", "2026-06-01T07:00:00Z"),
            "2026-06-08 06:30",
            "2026-06-01 is a Monday"
        );
        assert_eq!(next("0 0 1 */3 *", "2026-06-01T07:00:00Z"), "2026-07-01 00:00");
        assert_eq!(next("0 0 29 2 *", "2026-06-01T00:00:00Z"), "2028-02-29 00:00");
        assert_eq!(
            next("0 12 13 * 5", "2026-06-01T00:00:00Z"),
            "2026-06-05 12:00",
            "day of month or Friday"
        );
        assert_eq!(next("0 0 * * 7", "2026-06-01T00:00:00Z"), "2026-06-07 00:00", "7 is Sunday");
        assert_eq!(
            next("0 0 */2 * 1", "2026-06-01T07:00:00Z"),
            "2026-06-15 00:00",
            "an odd day and a Monday"
        );
        assert!(Schedule::parse("0 0 31 2 *").unwrap().next_after(Instant(0)).is_none());
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (bad, says) in [
            ("0 2 * *", "five fields"),
            ("61 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("*/0 * * * *", "step"),
            ("a * * * *", "not a number"),
            ("5-1 * * * *", "out of range"),
        ] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
