//! Report writers: the JSON report (a stable contract, documented in the README), a text
//! summary for a person, and CSV with one row per patient and trial.

use crate::Screening;
use crate::criteria::eval::TrialResult;
use crate::criteria::{Kind, Outcome, Status};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Serialize)]
struct UnmappedOut<'a> {
    system: &'a str,
    code: &'a str,
    unit: &'a str,
    count: usize,
}

#[derive(Serialize)]
struct Summary {
    patients: usize,
    trials: Vec<TrialSummary>,
}

#[derive(Serialize)]
struct TrialSummary {
    trial: String,
    eligible: usize,
    potentially_eligible: usize,
    ineligible: usize,
    error: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    as_of: String,
    results: &'a [TrialResult],
    provenance: &'a crate::Provenance,
    unmapped: Vec<UnmappedOut<'a>>,
    input_issues: &'a [crate::fhir::InputIssue],
    summary: Summary,
}

fn summary(s: &Screening) -> Summary {
    let mut trials: Vec<TrialSummary> = Vec::new();
    for r in &s.results {
        let t = match trials.iter_mut().find(|t| t.trial == r.trial) {
            Some(t) => t,
            None => {
                trials.push(TrialSummary {
                    trial: r.trial.clone(),
                    eligible: 0,
                    potentially_eligible: 0,
                    ineligible: 0,
                    error: 0,
                });
                trials.last_mut().expect("just pushed")
            }
        };
        match r.status {
            Status::Eligible => t.eligible += 1,
            Status::PotentiallyEligible => t.potentially_eligible += 1,
            Status::Ineligible => t.ineligible += 1,
            Status::Error => t.error += 1,
        }
    }
    Summary {
        patients: s.patients,
        trials,
    }
}

pub fn json(s: &Screening) -> String {
    let report = Report {
        as_of: s.as_of.to_string(),
        results: &s.results,
        provenance: &s.provenance,
        unmapped: s
            .unmapped
            .counts
            .iter()
            .map(|((system, code, unit), count)| UnmappedOut {
                system,
                code,
                unit,
                count: *count,
            })
            .collect(),
        input_issues: &s.issues,
        summary: summary(s),
    };
    // Serializing plain structs of strings and numbers cannot fail.
    serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
}

fn ids(r: &TrialResult, outcome: Outcome) -> Vec<&str> {
    r.criteria.iter().filter(|c| c.outcome == outcome).map(|c| c.id.as_str()).collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn csv(s: &Screening) -> String {
    let mut out = String::from("patient,trial,status,decided_by,unknown,manual\n");
    for r in &s.results {
        let deciding: Vec<&str> = r.decided_by.iter().map(|d| d.id.as_str()).collect();
        let mut deciding = deciding.join(" ");
        if let Some(rec) = &r.record {
            deciding = if deciding.is_empty() {
                format!("record: {rec}")
            } else {
                format!("record: {rec}; {deciding}")
            };
        }
        let _ = writeln!(
            out,
            "{},{},{},{},{},{}",
            csv_field(&r.patient),
            csv_field(&r.trial),
            r.status.as_str(),
            csv_field(&deciding),
            ids(r, Outcome::Unknown).join(" "),
            ids(r, Outcome::Manual).join(" ")
        );
    }
    out
}

fn short(s: &str, n: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

pub fn text(s: &Screening) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trialgate {} — screening as of {} — {} patient(s)\n",
        s.provenance.version, s.as_of, s.patients
    );
    let mut current = "";
    for r in &s.results {
        if r.patient != current {
            current = &r.patient;
            let _ = writeln!(out, "{}", r.patient);
        }
        let _ = writeln!(out, "  {:<28} {}", r.trial, r.status.as_str().to_uppercase());
        if let Some(rec) = &r.record {
            let _ = writeln!(out, "      not a candidate: {rec}");
        }
        for c in &r.criteria {
            let deciding =
                (c.kind == Kind::Inclusion && c.outcome == Outcome::NotMet) || (c.kind == Kind::Exclusion && c.outcome == Outcome::Met);
            if deciding {
                let _ = writeln!(out, "      ✗ {} [{}] \"{}\"", c.id, c.kind.as_str(), short(&c.text, 90));
                let _ = writeln!(out, "          {}", short(&c.reason, 160));
            }
        }
        if matches!(r.status, Status::Eligible | Status::PotentiallyEligible) {
            for c in r.criteria.iter().filter(|c| c.outcome == Outcome::Unknown) {
                let _ = writeln!(out, "      ? {}: {}", c.id, short(&c.reason, 150));
            }
            let manual = ids(r, Outcome::Manual);
            if !manual.is_empty() {
                let _ = writeln!(out, "      manual review ({}): {}", manual.len(), manual.join(", "));
            }
        }
    }
    let sum = summary(s);
    let _ = writeln!(out, "\nSummary: eligible / potentially eligible / ineligible / error");
    for t in &sum.trials {
        let _ = writeln!(
            out,
            "  {:<28} {:>5} / {:>5} / {:>5} / {:>5}",
            t.trial, t.eligible, t.potentially_eligible, t.ineligible, t.error
        );
    }
    if !s.issues.is_empty() {
        let _ = writeln!(out, "\nInput problems ({}), each skipped:", s.issues.len());
        for i in &s.issues {
            let _ = writeln!(out, "  {}: {}", i.location, short(&i.message, 200));
        }
    }
    if !s.unmapped.counts.is_empty() {
        let _ = writeln!(
            out,
            "\n{} code/unit combination(s) seen but not mapped (see `unmapped` in --format json)",
            s.unmapped.counts.len()
        );
    }
    out
}
