//! Backup policies: when to back up (a cron schedule) and which backups to keep (retention).
//! Pure functions, so the scheduler's decisions can be tested without a clock or a store.
//!
//! * Schedules are five-field cron expressions in UTC (minute hour day-of-month month
//!   day-of-week; weekdays 0-6 from Sunday, 7 = Sunday), parsed by `croner`; a sixth field in
//!   front gives seconds (`*/30 * * * * *`: every 30 s) for short intervals.
//! * Retention keeps a backup when any rule keeps it: the `keep_last` newest; for
//!   `keep_daily` / `keep_weekly` / `keep_monthly`, the newest backup of each of the N most
//!   recent days / ISO weeks / months that have backups (UTC). With no rule at all, everything
//!   is kept. Everything else is expired.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    text: String,
    cron: Cron,
}

/// Why a policy's settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid schedule {text:?}: {why} (expected five cron fields in UTC, e.g. \"0 2 * * *\" or \"*/5 * * * *\", or six with seconds first)")]
    Schedule { text: String, why: String },
    #[error("a retention rule keeps at most {max} backups (got {got} for {rule})")]
    Retention { rule: &'static str, got: u32, max: u32 },
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, PolicyError> {
        let err = |why: String| PolicyError::Schedule { text: text.to_string(), why };
        let fields = text.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(err(format!("{fields} fields")));
        }
        let cron = Cron::from_str(text).map_err(|e| err(e.to_string()))?;
        Ok(Schedule { text: text.to_string(), cron })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first run strictly after `t` (Unix seconds), if the expression ever matches again.
    pub fn next_after(&self, t: u64) -> Option<u64> {
        let start = DateTime::<Utc>::from_timestamp(t as i64, 0)?;
        self.cron.find_next_occurrence(&start, false).ok().map(|d| d.timestamp().max(0) as u64)
    }
}

/// Which backups to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
}

/// Most backups one rule may keep (the service description allows 20 per disk anyway).
pub const MAX_KEEP: u32 = 10_000;

impl Retention {
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (rule, got) in [
            ("keep-last", self.keep_last),
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
        ] {
            if got > MAX_KEEP {
                return Err(PolicyError::Retention { rule, got, max: MAX_KEEP });
            }
        }
        Ok(())
    }

    fn keeps_everything(&self) -> bool {
        self.keep_last == 0 && self.keep_daily == 0 && self.keep_weekly == 0 && self.keep_monthly == 0
    }
}

/// The ids among `backups` (id, creation time in Unix milliseconds) that `r` does not keep.
pub fn expired(backups: &[(String, u64)], r: &Retention) -> Vec<String> {
    if r.keeps_everything() {
        return Vec::new();
    }
    // Newest first; ties broken by id so the result does not depend on input order.
    let mut sorted: Vec<&(String, u64)> = backups.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for (id, _) in sorted.iter().take(r.keep_last as usize) {
        keep.insert(id);
    }
    // Keeps the newest backup of each of the `n` newest periods `key` defines.
    fn bucketed<'a>(
        sorted: &[&'a (String, u64)],
        n: u32,
        key: &dyn Fn(DateTime<Utc>) -> (i32, u32, u32),
        keep: &mut BTreeSet<&'a str>,
    ) {
        let mut seen = Vec::new();
        for (id, ms) in sorted.iter().copied() {
            if seen.len() as u32 >= n {
                break;
            }
            let k = key(DateTime::<Utc>::from_timestamp_millis(*ms as i64).unwrap_or_default());
            if !seen.contains(&k) {
                seen.push(k);
                keep.insert(id);
            }
        }
    }
    // Each closure maps a time to its period; the newest backup of a period is the first seen.
    let day = |t: DateTime<Utc>| (t.year(), t.ordinal(), 0);
    let week = |t: DateTime<Utc>| {
        let w = t.iso_week();
        (w.year(), w.week(), 1)
    };
    let month = |t: DateTime<Utc>| (t.year(), t.month(), 2);
    bucketed(&sorted, r.keep_daily, &day, &mut keep);
    bucketed(&sorted, r.keep_weekly, &week, &mut keep);
    bucketed(&sorted, r.keep_monthly, &month, &mut keep);
    sorted.iter().filter(|(id, _)| !keep.contains(id.as_str())).map(|(id, _)| id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        // 2026-12-01 00:01:30 → 00:05:00.
        let t = DateTime::parse_from_rfc3339("2026-12-01T00:01:30Z").unwrap().timestamp() as u64;
        let next = s.next_after(t).unwrap();
        assert_eq!(DateTime::<Utc>::from_timestamp(next as i64, 0).unwrap().to_rfc3339(), "2026-12-01T00:05:00+00:00");
        assert_eq!(s.next_after(next).unwrap(), next + 300, "strictly after");
        let daily = Schedule::parse("0 2 * * *").unwrap();
        let n = daily.next_after(t).unwrap();
        assert_eq!(DateTime::<Utc>::from_timestamp(n as i64, 0).unwrap().to_rfc3339(), "2026-12-01T02:00:00+00:00");
        // Weekdays are Unix-style: 1-5 is Monday to Friday. 2026-12-05 is a Saturday.
        let weekdays = Schedule::parse("0 9 * * 1-5").unwrap();
        let sat = DateTime::parse_from_rfc3339("2026-12-05T10:00:00Z").unwrap().timestamp() as u64;
        let n = weekdays.next_after(sat).unwrap();
        assert_eq!(DateTime::<Utc>::from_timestamp(n as i64, 0).unwrap().to_rfc3339(), "2026-12-07T09:00:00+00:00");

        // Six fields: seconds first.
        let s2 = Schedule::parse("*/2 * * * * *").unwrap();
        assert_eq!(s2.next_after(t).unwrap(), t + 2 - t % 2);
        for bad in ["", "* * * *", "0 0 * * * * * *", "61 * * * *", "every day", "*/0 * * * *"] {
            let e = Schedule::parse(bad).unwrap_err();
            assert!(e.to_string().contains("invalid schedule"), "{bad:?}: {e}");
        }
    }

    fn ms(day: u32, hour: u32) -> u64 {
        let t = DateTime::parse_from_rfc3339(&format!("2026-11-{day:02}T{hour:02}:00:00Z")).unwrap();
        t.timestamp_millis() as u64
    }

    #[test]
    fn retention_rules() {
        // Two backups a day from 2026-11-01 to 2026-11-20.
        let mut b = Vec::new();
        for d in 1..=20 {
            for h in [1, 13] {
                b.push((format!("bk-{d:02}-{h:02}"), ms(d, h)));
            }
        }
        assert!(expired(&b, &Retention::default()).is_empty(), "no rule: keep everything");
        let e = expired(&b, &Retention { keep_last: 3, ..Default::default() });
        assert_eq!(e.len(), 37);
        assert!(!e.contains(&"bk-20-13".to_string()) && !e.contains(&"bk-19-13".to_string()));
        // Daily 5: the newest of each of the last five days.
        let kept: Vec<String> = {
            let e = expired(&b, &Retention { keep_daily: 5, ..Default::default() });
            b.iter().map(|(id, _)| id.clone()).filter(|id| !e.contains(id)).collect()
        };
        assert_eq!(kept, vec!["bk-16-13", "bk-17-13", "bk-18-13", "bk-19-13", "bk-20-13"]);
        // Weekly 2: ISO weeks of 2026-11-20 (Fri, week 47) and the week before (46: ends Sun 15th).
        let kept: Vec<String> = {
            let e = expired(&b, &Retention { keep_weekly: 2, ..Default::default() });
            b.iter().map(|(id, _)| id.clone()).filter(|id| !e.contains(id)).collect()
        };
        assert_eq!(kept, vec!["bk-15-13", "bk-20-13"]);
        // Rules combine: keep-last 1 + monthly 2 (only November has backups).
        let e = expired(&b, &Retention { keep_last: 1, keep_monthly: 2, ..Default::default() });
        assert_eq!(e.len(), 39, "the newest backup is both the last and November's");
        // Input order does not matter.
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(
            expired(&rev, &Retention { keep_daily: 3, ..Default::default() }).len(),
            expired(&b, &Retention { keep_daily: 3, ..Default::default() }).len()
        );
        assert!(Retention { keep_last: MAX_KEEP + 1, ..Default::default() }.validate().is_err());
    }
}
