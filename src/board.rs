//! The service's board: the latest verdict per (patient, trial), with the person, the status
//! before it changed and when it changed, for the coordinator's page (`GET /`). Every
//! `POST /screen` and `$screen` records its results here; `merge` brings in the verdict
//! history's newer ones (finished sweeps, the re-screens `/notify` starts, earlier runs of
//! the service) at each view.
//!
//! In memory only, and bounded: at most `max_rows` rows (a row is the page's short form of a
//! result, about 1 to 3 KB: reasons and references, not the criteria's texts or the facts);
//! past that, the row screened longest ago is dropped. A restart empties it; the verdict
//! history (when configured) refills it at the next view.

use crate::criteria::Status;
use crate::criteria::eval::TrialResult;
use crate::report::page::{self, PageRow, PageView};
use crate::time::{Date, Instant};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

type Key = (String, String);

struct Entry {
    row: PageRow,
    /// When the row was last written: the order rows are dropped in when the board is full.
    seq: u64,
    /// When its verdict was made, to tell whether the history holds a newer one.
    made: Instant,
    /// When the status last changed, if the board saw it change.
    changed: Option<Instant>,
}

#[derive(Default)]
struct Rows {
    by_key: HashMap<Key, Entry>,
    by_age: BTreeMap<u64, Key>,
    next: u64,
}

pub struct Board {
    rows: Mutex<Rows>,
    max_rows: usize,
}

impl Board {
    pub fn new(max_rows: usize) -> Board {
        Board {
            rows: Mutex::new(Rows::default()),
            max_rows: max_rows.max(1),
        }
    }

    /// Records the verdicts of one screening as of `as_of`, made at `now`. A status that
    /// differs from the one on the board keeps the old one as the previous status.
    pub fn record(&self, results: &[TrialResult], as_of: Date, now: Instant) {
        let Ok(mut rows) = self.rows.lock() else {
            return;
        };
        for r in results {
            let key = (r.patient.clone(), r.trial.clone());
            let (previous, changed) = match rows.by_key.get(&key) {
                Some(old) if old.row.status != r.status => (Some(old.row.status), Some(now)),
                Some(old) => (old.row.previous, old.changed),
                None => (None, None),
            };
            let when = format!("screened as of {as_of}");
            rows.put(key, PageRow::of(r), previous, when, now, changed, self.max_rows);
        }
    }

    /// Brings in verdicts from the verdict history, each made at `made`, with the status
    /// before its last change when the history knows it: those newer than the board's row.
    pub fn merge(&self, latest: Vec<(TrialResult, Instant, Option<Status>)>) {
        let Ok(mut rows) = self.rows.lock() else {
            return;
        };
        for (r, made, before) in latest {
            let key = (r.patient.clone(), r.trial.clone());
            let (previous, changed) = match rows.by_key.get(&key) {
                // Times are in seconds: within the same second, a different status from the
                // history is taken as the later one (the history records every re-screen).
                Some(old) if old.made > made || (old.made == made && old.row.status == r.status) => continue,
                Some(old) if old.row.status != r.status => (Some(old.row.status), Some(made)),
                Some(old) => (old.row.previous, old.changed),
                None => (before.filter(|b| *b != r.status), None),
            };
            let when = format!("screened {made}");
            rows.put(key, PageRow::of(&r), previous, when, made, changed, self.max_rows);
        }
    }

    pub fn len(&self) -> usize {
        self.rows.lock().map(|r| r.by_key.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The status of a (patient, trial) and the one before, if the board has it.
    pub fn status(&self, patient: &str, trial: &str) -> Option<(Status, Option<Status>)> {
        let rows = self.rows.lock().ok()?;
        let e = rows.by_key.get(&(patient.to_string(), trial.to_string()))?;
        Some((e.row.status, e.row.previous))
    }

    /// The coordinator's page of the board, one section per trial in `trials`' order.
    pub fn render(&self, trials: &[String], link_base: Option<&str>, account: Option<&str>, sign_out: bool) -> String {
        let Ok(rows) = self.rows.lock() else {
            return String::new();
        };
        let list: Vec<&PageRow> = rows.by_key.values().map(|e| &e.row).collect();
        let patients = {
            let mut p: Vec<&str> = list.iter().map(|r| r.patient.as_str()).collect();
            p.sort_unstable();
            p.dedup();
            p.len()
        };
        let intro = format!(
            "The latest verdict for each of {patients} patient(s) screened through this service or recorded in its verdict \
             history (at most {} rows are kept). Each row gives its screening date.",
            self.max_rows
        );
        page::page(&PageView {
            title: "Trial candidates: latest verdicts",
            intro: &intro,
            trials,
            rows: &list,
            link_base,
            account,
            sign_out,
        })
    }
}

impl Rows {
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        key: Key,
        mut row: PageRow,
        previous: Option<Status>,
        when: String,
        made: Instant,
        changed: Option<Instant>,
        max: usize,
    ) {
        row.previous = previous;
        row.when = Some(match changed {
            Some(t) => format!("{when}; changed {t}"),
            None => when,
        });
        let seq = self.next;
        self.next += 1;
        if let Some(old) = self.by_key.insert(key.clone(), Entry { row, seq, made, changed }) {
            self.by_age.remove(&old.seq);
        }
        self.by_age.insert(seq, key);
        while self.by_key.len() > max {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            self.by_key.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(patient: &str, trial: &str, status: Status) -> TrialResult {
        TrialResult {
            patient: patient.into(),
            person: None,
            trial: trial.into(),
            status,
            record: None,
            decided_by: Vec::new(),
            criteria: Vec::new(),
            facts: Vec::new(),
        }
    }

    fn day() -> Date {
        Date::parse("2026-06-01").unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn a_change_keeps_the_status_before_and_when() {
        let b = Board::new(100);
        b.record(&[result("Patient/a", "T", Status::Ineligible)], day(), Instant(100));
        assert_eq!(b.status("Patient/a", "T"), Some((Status::Ineligible, None)));
        b.record(&[result("Patient/a", "T", Status::PotentiallyEligible)], day(), Instant(200));
        assert_eq!(
            b.status("Patient/a", "T"),
            Some((Status::PotentiallyEligible, Some(Status::Ineligible)))
        );
        // The same status again keeps the change it came from.
        b.record(&[result("Patient/a", "T", Status::PotentiallyEligible)], day(), Instant(300));
        assert_eq!(
            b.status("Patient/a", "T"),
            Some((Status::PotentiallyEligible, Some(Status::Ineligible)))
        );
        let html = b.render(&["T".into()], None, None, false);
        assert!(html.contains("newly eligible"), "{html}");
        assert!(html.contains("changed 1970-01-01T00:03:20Z"), "{html}");
    }

    #[test]
    fn the_history_brings_newer_verdicts_only() {
        let b = Board::new(100);
        b.record(&[result("Patient/a", "T", Status::PotentiallyEligible)], day(), Instant(500));
        b.merge(vec![
            // Older than the board's row: ignored.
            (result("Patient/a", "T", Status::Eligible), Instant(400), None),
            // New to the board, with the status before its last change.
            (
                result("Patient/b", "T", Status::PotentiallyEligible),
                Instant(450),
                Some(Status::Ineligible),
            ),
        ]);
        assert_eq!(b.status("Patient/a", "T"), Some((Status::PotentiallyEligible, None)));
        assert_eq!(
            b.status("Patient/b", "T"),
            Some((Status::PotentiallyEligible, Some(Status::Ineligible)))
        );
        // A re-screen in the same second that changed the status counts as the later one.
        b.merge(vec![(result("Patient/b", "T", Status::Eligible), Instant(450), None)]);
        assert_eq!(
            b.status("Patient/b", "T"),
            Some((Status::Eligible, Some(Status::PotentiallyEligible)))
        );
        // A newer re-screen that changed the status.
        b.merge(vec![(result("Patient/a", "T", Status::Ineligible), Instant(600), None)]);
        assert_eq!(
            b.status("Patient/a", "T"),
            Some((Status::Ineligible, Some(Status::PotentiallyEligible)))
        );
        let html = b.render(&["T".into()], None, None, false);
        assert!(
            html.contains("screened 1970-01-01T00:10:00Z; changed 1970-01-01T00:10:00Z"),
            "{html}"
        );
    }

    #[test]
    fn the_board_is_bounded_dropping_the_oldest() {
        let b = Board::new(2);
        for p in ["Patient/a", "Patient/b", "Patient/c"] {
            b.record(&[result(p, "T", Status::Eligible)], day(), Instant(1));
        }
        assert_eq!(b.len(), 2);
        assert!(b.status("Patient/a", "T").is_none());
        // Writing a row again makes it the newest.
        b.record(&[result("Patient/b", "T", Status::Eligible)], day(), Instant(2));
        b.record(&[result("Patient/d", "T", Status::Eligible)], day(), Instant(3));
        assert!(b.status("Patient/b", "T").is_some() && b.status("Patient/c", "T").is_none());
    }
}
