//! Backup schedules in the syntax a CronJob takes: five fields (minute, hour, day of month,
//! month, day of week) with `*`, lists, ranges, steps and names, or `@hourly`, `@daily`,
//! `@weekly`, `@monthly`, `@yearly`. Times are UTC. As in a CronJob, when both day fields are
//! restricted (anything but `*`) a day matching either one fires.

use k8s_openapi::jiff::civil::{Date, DateTime};
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{Timestamp, ToSpan};

/// A parsed schedule: for each field, the set of values that fire (as bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_restricted: bool,
    weekdays_restricted: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Schedule, String> {
        let expanded = match s.trim() {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{s:?}: a schedule has five fields (minute hour day-of-month month day-of-week), or is @hourly, @daily, @weekly, @monthly or @yearly"
            ));
        }
        let minutes = field(fields[0], 0, 59, &[], "minute")?;
        let hours = field(fields[1], 0, 23, &[], "hour")?;
        let days = field(fields[2], 1, 31, &[], "day of month")?;
        let months = field(fields[3], 1, 12, &MONTHS, "month")?;
        // 7 is Sunday too.
        let mut weekdays = field(fields[4], 0, 7, &WEEKDAYS, "day of week")?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        // As a CronJob reads it: only `*` leaves a day field open; `*/2` restricts it.
        let open = |f: &str| f == "*" || f == "*/1";
        let sched = Schedule {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: (weekdays & 0x7f) as u8,
            days_restricted: !open(fields[2]),
            weekdays_restricted: !open(fields[4]),
        };
        // Five years from 2000 hold every calendar day there is, 29 February included.
        let reference: Timestamp = "2000-01-01T00:00:00Z".parse().map_err(|e| format!("{e}"))?;
        if sched.next_after(reference).is_none() {
            return Err(format!("{s:?} never fires (no such day)"));
        }
        Ok(sched)
    }
}

fn field(text: &str, min: u32, max: u32, names: &[&str], what: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{what} field {text:?}: {why}");
    let value = |v: &str| -> Result<u32, String> {
        let lower = v.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            // Months are named from 1, weekdays from 0.
            return Ok(i as u32 + min);
        }
        let n: u32 = v
            .parse()
            .map_err(|_| bad(&format!("{v:?} is not a number")))?;
        if n < min || n > max {
            return Err(bad(&format!("{n} is outside {min}-{max}")));
        }
        Ok(n)
    };
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| bad("the step is not a number"))?;
                if step == 0 || step > max - min {
                    return Err(bad(&format!("a step must be 1-{}", max - min)));
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(bad("a range that ends before it starts"));
            }
            (a, b)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end, every 15.
            (v, if step > 1 { max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v = v.saturating_add(step);
        }
    }
    if bits == 0 {
        return Err(bad("matches nothing"));
    }
    Ok(bits)
}

impl Schedule {
    fn day_matches(&self, d: Date) -> bool {
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().to_sunday_zero_offset()) != 0;
        match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => dom || dow,
            (true, false) => dom,
            (false, true) => dow,
            (false, false) => true,
        }
    }

    /// The first time strictly after `after` at which the schedule fires, within five years.
    pub fn next_after(&self, after: Timestamp) -> Option<Timestamp> {
        let start: DateTime = after.to_zoned(TimeZone::UTC).datetime();
        let mut day = start.date();
        // The minute after `after`, on the first day; any minute on later days.
        let (mut from_hour, mut from_minute) = (start.hour(), start.minute() + 1);
        for _ in 0..(366 * 5) {
            if self.day_matches(day) {
                for h in from_hour..24 {
                    if self.hours & (1 << h) == 0 {
                        continue;
                    }
                    let first = if h == from_hour { from_minute } else { 0 };
                    for m in first..60 {
                        if self.minutes & (1 << m) != 0 {
                            return day
                                .at(h, m, 0, 0)
                                .to_zoned(TimeZone::UTC)
                                .ok()
                                .map(|z| z.timestamp());
                        }
                    }
                }
            }
            day = day.checked_add(1.day()).ok()?;
            (from_hour, from_minute) = (0, 0);
        }
        None
    }

    /// The last time at or before `now` at which the schedule fired, not earlier than
    /// `not_before` (what a controller that was away missed, at most one of).
    pub fn last_at_or_before(&self, not_before: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let mut t = self.next_after(not_before)?;
        if t > now {
            return None;
        }
        // Walk forward; schedules fire at most once a minute, and a controller catches up at
        // most once, so the walk is bounded by the gap it was away for (capped below).
        for _ in 0..100_000 {
            match self.next_after(t) {
                Some(n) if n <= now => t = n,
                _ => return Some(t),
            }
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(sched: &str, after: &str) -> String {
        let s: Schedule = sched.parse().unwrap();
        s.next_after(at(after)).unwrap().to_string()
    }

    #[test]
    fn schedules_fire_when_cron_would() {
        assert_eq!(
            next("* * * * *", "2026-12-06T13:00:30Z"),
            "2026-12-06T13:01:00Z"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-12-06T13:00:00Z"),
            "2026-12-06T13:15:00Z"
        );
        assert_eq!(
            next("0 */6 * * *", "2026-12-06T13:00:00Z"),
            "2026-12-06T18:00:00Z"
        );
        assert_eq!(
            next("@daily", "2026-12-31T23:59:59Z"),
            "2027-01-01T00:00:00Z"
        );
        assert_eq!(
            next("30 2 * * mon-fri", "2026-12-05T00:00:00Z"),
            "2026-12-07T02:30:00Z"
        );
        assert_eq!(
            next("0 0 29 feb *", "2026-03-01T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
        // Both day fields restricted: either one fires.
        assert_eq!(
            next("0 0 15 * 0", "2026-12-01T00:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
        assert_eq!(
            next("0 0 * * 7", "2026-12-01T00:00:00Z"),
            "2026-12-06T00:00:00Z"
        );
        assert_eq!(
            next("5/20 1 * * *", "2026-12-06T01:06:00Z"),
            "2026-12-06T01:25:00Z"
        );
        assert_eq!(
            next("0,30 9-10 1 jan,jul *", "2026-06-01T00:00:00Z"),
            "2026-07-01T09:00:00Z"
        );
    }

    #[test]
    fn a_missed_run_is_caught_up_once() {
        let s: Schedule = "0 * * * *".parse().unwrap();
        assert_eq!(
            s.last_at_or_before(at("2026-12-06T10:30:00Z"), at("2026-12-06T13:10:00Z")),
            Some(at("2026-12-06T13:00:00Z"))
        );
        assert_eq!(
            s.last_at_or_before(at("2026-12-06T13:00:00Z"), at("2026-12-06T13:59:00Z")),
            None
        );
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (bad, says) in [
            ("* * * *", "five fields"),
            ("60 * * * *", "outside 0-59"),
            ("* 24 * * *", "outside 0-23"),
            ("*/0 * * * *", "step must be 1-59"),
            ("1/4294967295 * * * *", "step must be 1-59"),
            ("0 0 30 feb *", "never fires"),
            ("0 0 31 apr,jun *", "never fires"),
            ("5-1 * * * *", "ends before"),
            ("* * 0 * *", "outside 1-31"),
            ("* * * foo *", "not a number"),
            ("@often", "five fields"),
        ] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_stepped_day_field_restricts_the_day_as_in_a_cronjob() {
        // Odd days or Mondays, not only Mondays.
        assert_eq!(
            next("0 0 */2 * 1", "2026-12-01T12:00:00Z"),
            "2026-12-03T00:00:00Z"
        );
    }
}
