//! Outcome-only evaluation (`Detail::Outcome`, what `--format csv` asks for) decides exactly
//! what full evaluation decides: every status, every decider, every criterion's outcome and
//! applied decision, and the same CSV, on the fixtures and on a generated BENCH-LN cohort, for
//! the five seed trials and BENCH-LN. And it really leaves the explanations out, while full
//! evaluation still gives them.

use std::path::{Path, PathBuf};
use std::process::Command;
use trialgate::criteria::Detail;
use trialgate::criteria::decisions::Decisions;
use trialgate::criteria::eval::TrialResult;
use trialgate::criteria::{Outcome, Status};
use trialgate::report::{Format, Totals, Writer};
use trialgate::time::Date;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn as_of() -> Date {
    Date::parse("2026-06-01").unwrap()
}

fn seed_trials() -> trialgate::Config {
    trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[]).expect("the seed trials load")
}

fn bench_trial() -> trialgate::Config {
    let trial = root().join("config/bench/bench-ln.yaml").display().to_string();
    trialgate::load_config(&root().join("mappings"), &root().join("config/trials"), &[trial]).expect("bench-ln loads")
}

/// Screens `path` at `detail` through the path `trialgate screen` takes; the results and
/// the CSV report written from them.
fn screen(path: &Path, cfg: &trialgate::Config, decisions: &Decisions, detail: Detail) -> (Vec<TrialResult>, String) {
    let mut results = Vec::new();
    let totals = trialgate::screen_each(path, cfg, as_of(), decisions, None, detail, &mut |_| {}, &mut |r| results.push(r))
        .expect("the input screens");
    let mut w = Writer::new(Vec::new(), Format::Csv, as_of(), "test", totals.patients);
    for r in &results {
        w.result(r);
    }
    let bytes = w
        .finish(&Totals {
            patients: totals.patients,
            provenance: &totals.provenance,
            unmapped: &totals.unmapped,
            issues: &totals.issues,
        })
        .expect("writing to memory");
    (results, String::from_utf8(bytes).expect("the CSV is UTF-8"))
}

/// Everything that decides, of one result: what must not depend on the detail.
fn verdict(r: &TrialResult) -> String {
    let criteria: Vec<String> = r
        .criteria
        .iter()
        .map(|c| {
            format!(
                "{}:{}:{}:{}",
                c.id,
                c.kind.as_str(),
                c.outcome.as_str(),
                c.decision.as_ref().map(|d| d.answer.as_str()).unwrap_or("-")
            )
        })
        .collect();
    let deciders: Vec<&str> = r.decided_by.iter().map(|d| d.id.as_str()).collect();
    format!(
        "{} {} {} record={:?} decided_by=[{}] criteria=[{}]",
        r.patient,
        r.trial,
        r.status.as_str(),
        r.record,
        deciders.join(" "),
        criteria.join(" ")
    )
}

/// Screens `path` at both details and checks they agree; returns the full results.
fn agree(label: &str, path: &Path, cfg: &trialgate::Config, decisions: &Decisions) -> Vec<TrialResult> {
    let (full, full_csv) = screen(path, cfg, decisions, Detail::Full);
    let (bare, bare_csv) = screen(path, cfg, decisions, Detail::Outcome);
    assert!(!full.is_empty(), "{label}: nothing screened");
    assert_eq!(full.len(), bare.len(), "{label}: as many results at each detail");
    let mut differ = Vec::new();
    for (f, b) in full.iter().zip(&bare) {
        let (vf, vb) = (verdict(f), verdict(b));
        if vf != vb {
            differ.push(format!("full:    {vf}\noutcome: {vb}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{label}: {} result(s) differ between the details:\n{}",
        differ.len(),
        differ.join("\n")
    );
    assert_eq!(full_csv, bare_csv, "{label}: the CSV report differs");

    // The outcome-only results really carry no explanation ...
    for b in &bare {
        assert!(b.facts.is_empty() && b.person.is_none(), "{label}: {}: facts kept", b.patient);
        assert!(b.decided_by.iter().all(|d| d.text.is_empty()), "{label}: {}: texts kept", b.patient);
        for c in &b.criteria {
            assert!(
                c.reason.is_empty() && c.evidence.is_empty() && c.text.is_empty() && c.note.is_none(),
                "{label}: {} {} {}: explanation built: {:?}",
                b.patient,
                b.trial,
                c.id,
                c.reason
            );
        }
    }
    // ... and the full ones still do: a reason for every criterion, evidence and facts.
    for f in &full {
        for c in &f.criteria {
            assert!(!c.reason.is_empty(), "{label}: {} {} {}: no reason", f.patient, f.trial, c.id);
            assert!(!c.text.is_empty(), "{label}: {} {} {}: no text", f.patient, f.trial, c.id);
        }
        assert!(
            f.decided_by.iter().all(|d| !d.text.is_empty()),
            "{label}: {}: a decider without its text",
            f.patient
        );
    }
    assert!(full.iter().any(|r| !r.facts.is_empty()), "{label}: no facts in full detail");
    assert!(
        full.iter().flat_map(|r| &r.criteria).any(|c| !c.evidence.is_empty()),
        "{label}: no evidence in full detail"
    );
    full
}

/// Decisions answering the first `n` undecided criteria of `results` (met and not-met in
/// turn), written to a file in `dir`: decisions apply at both details alike.
fn decisions_for(results: &[TrialResult], n: usize, dir: &Path) -> (Decisions, usize) {
    let mut yaml = String::new();
    let mut count = 0;
    for r in results {
        for c in r
            .criteria
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Manual | Outcome::Unknown))
        {
            if count == n {
                break;
            }
            let answer = if count % 2 == 0 { "met" } else { "not-met" };
            yaml.push_str(&format!(
                "- patient: {}\n  trial: {}\n  criterion: {}\n  answer: {answer}\n  by: test\n  at: 2026-05-20\n",
                r.patient, r.trial, c.id
            ));
            count += 1;
        }
    }
    let path = dir.join("decisions.yaml");
    std::fs::write(&path, yaml).expect("the decisions file is written");
    (Decisions::load(&path).expect("the decisions load"), count)
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("trialgate-detail-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn outcome_detail_decides_as_full_detail_on_the_fixtures() {
    let tmp = TempDir::new("fixtures");
    for (name, cfg) in [("seed trials", seed_trials()), ("bench-ln", bench_trial())] {
        let full = agree(name, &root().join("fixtures"), &cfg, &Decisions::default());
        // The fixtures hold the records that are never candidates (deceased, inactive, merged).
        assert!(full.iter().any(|r| r.record.is_some()), "{name}: no deceased or inactive patient");
        for input in ["fixtures/bundles", "fixtures/bulk", "fixtures/synthea"] {
            agree(&format!("{name}, {input}"), &root().join(input), &cfg, &Decisions::default());
        }
        // Recorded answers change outcomes the same way at both details.
        let (decisions, n) = decisions_for(&full, 12, &tmp.0);
        assert!(n > 0, "{name}: the fixtures have undecided criteria to answer");
        let answered = agree(&format!("{name}, with decisions"), &root().join("fixtures"), &cfg, &decisions);
        let applied = answered.iter().flat_map(|r| &r.criteria).filter(|c| c.decision.is_some()).count();
        assert_eq!(applied, n, "{name}: every decision applied");
    }
}

#[test]
fn outcome_detail_decides_as_full_detail_on_a_bench_ln_cohort() {
    let tmp = TempDir::new("cohort");
    let data = tmp.0.join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let generator = root().join("../shared/bench/gen_cohort.py");
    let out = Command::new("python3")
        .args([
            generator.to_str().unwrap(),
            "--patients",
            "800",
            "--out",
            data.to_str().unwrap(),
            "--seed",
            "11",
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "gen_cohort.py: {}", String::from_utf8_lossy(&out.stderr));
    let bench = agree("bench-ln cohort", &data, &bench_trial(), &Decisions::default());
    // The cohort must reach every status and every outcome, or agreement proves little.
    for s in [Status::Eligible, Status::PotentiallyEligible, Status::Ineligible] {
        assert!(bench.iter().any(|r| r.status == s), "no {} patient", s.as_str());
    }
    for o in [Outcome::Met, Outcome::NotMet, Outcome::Unknown] {
        assert!(
            bench.iter().flat_map(|r| &r.criteria).any(|c| c.outcome == o),
            "no {} criterion",
            o.as_str()
        );
    }
    let seed = agree("seed trials on the cohort", &data, &seed_trials(), &Decisions::default());
    assert!(
        seed.iter().flat_map(|r| &r.criteria).any(|c| c.outcome == Outcome::Manual),
        "no manual criterion"
    );
}
