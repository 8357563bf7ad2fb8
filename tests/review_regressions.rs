//! Regression tests for wrong verdicts found in review. Each repro bundle in
//! `tests/data/review/` (written by the reviewer's generator) is screened through the library
//! at 2026-06-01 and one criterion is checked against the correct behaviour. Two more cases
//! (a LOINC-coded pathology report, a folder with a symlink loop) are built in the test.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use trialgate::criteria::decisions::Decisions;
use trialgate::criteria::eval::{CriterionResult, TrialResult};
use trialgate::criteria::{Outcome, Status};
use trialgate::time::Date;
use trialgate::{Config, Screening};

const AS_OF: &str = "2026-06-01";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config() -> Config {
    let root = root();
    trialgate::load_config(&root.join("mappings"), &root.join("config/trials"), &[]).unwrap_or_else(|e| panic!("config does not load: {e}"))
}

fn screen_path(path: &Path) -> Screening {
    let cfg = config();
    trialgate::screen(path, &cfg, Date::parse(AS_OF).unwrap(), &Decisions::default())
        .unwrap_or_else(|e| panic!("screening {} failed: {e}", path.display()))
}

/// Screens `tests/data/review/<name>.json`.
fn screen_repro(name: &str) -> Screening {
    screen_path(&root().join("tests/data/review").join(format!("{name}.json")))
}

fn result<'a>(s: &'a Screening, patient: &str, trial: &str) -> &'a TrialResult {
    let found: Vec<&TrialResult> = s.results.iter().filter(|r| r.patient == patient && r.trial == trial).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one result for {patient} in {trial}; results: {:?}",
        s.results.iter().map(|r| (&r.patient, &r.trial)).collect::<Vec<_>>()
    );
    found[0]
}

fn criterion<'a>(r: &'a TrialResult, id: &str) -> &'a CriterionResult {
    r.criteria
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{} has no criterion {id}", r.trial))
}

fn show(c: &CriterionResult) -> String {
    format!("{} {:?}: {} | evidence {:?}", c.id, c.outcome, c.reason, c.evidence)
}

fn assert_outcome(r: &TrialResult, id: &str, want: Outcome) {
    let c = criterion(r, id);
    assert_eq!(c.outcome, want, "{} {}: {}", r.patient, r.trial, show(c));
}

fn assert_not_outcome(r: &TrialResult, id: &str, never: Outcome) {
    let c = criterion(r, id);
    assert_ne!(c.outcome, never, "{} {}: {}", r.patient, r.trial, show(c));
}

/// The criterion is not among the ones that made the patient ineligible.
fn assert_not_deciding(r: &TrialResult, id: &str) {
    let ids: Vec<&str> = r.decided_by.iter().map(|d| d.id.as_str()).collect();
    assert!(
        !ids.contains(&id),
        "{} {}: {id} must not decide the verdict; status {:?}, decided by {ids:?}; {}",
        r.patient,
        r.trial,
        r.status,
        show(criterion(r, id))
    );
}

/// A scratch folder under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("trialgate-review-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write_bundle(&self, file: &str, resources: &[Value]) -> PathBuf {
        let entries: Vec<Value> = resources.iter().map(|r| json!({ "resource": r })).collect();
        let bundle = json!({ "resourceType": "Bundle", "type": "collection", "entry": entries });
        let path = self.0.join(file);
        std::fs::write(&path, serde_json::to_string_pretty(&bundle).unwrap()).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn active_sle(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "id": id,
        "subject": { "reference": format!("Patient/{patient}") },
        "clinicalStatus": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active"
        }] },
        "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "55464009" }] },
        "onsetDateTime": "2015-03-01"
    })
}

// ---------------------------------------------------------------- dates

#[test]
fn year_only_onset_long_ago_satisfies_sle_for_12_weeks() {
    let s = screen_repro("a-partial-onset");
    let r = result(&s, "Patient/a-partial-onset", "NCT06535412");
    // onsetDateTime "2010" lies wholly before 2026-06-01 minus 12 weeks; the recent
    // recordedDate (2026-04-15) must not replace it.
    assert_outcome(r, "inc-1", Outcome::Met);
    assert_not_deciding(r, "inc-1");
}

#[test]
fn resolved_cancer_with_unknown_end_is_not_malignancy_within_5_years() {
    let s = screen_repro("f-old-cancer");
    // C50.911 resolved, onset "2005", recorded 2025-02-01, no abatement: when it ended is
    // unknown, so "within 5 years" cannot be decided either way.
    for (trial, id) in [
        ("NCT06406205", "exc-6b"),
        ("NCT06535412", "exc-5"),
        ("biologic-induction-ln", "exc-10d"),
    ] {
        let r = result(&s, "Patient/f-old-cancer", trial);
        assert_outcome(r, id, Outcome::Unknown);
        assert_not_deciding(r, id);
    }
}

// ---------------------------------------------------------------- labs

#[test]
fn creatinine_value_string_without_unit_is_not_read_as_mg_dl() {
    let s = screen_repro("l-cr-string");
    let r = result(&s, "Patient/l-cr-string", "NCT06406205");
    // valueString "88" with no unit: 88 mg/dL would give an eGFR of 0.3; the unit is unknown.
    assert_outcome(r, "exc-1", Outcome::Unknown);
    assert_not_deciding(r, "exc-1");
}

#[test]
fn newer_creatinine_in_umol_lowercase_l_converts_and_drives_egfr() {
    let s = screen_repro("k-cr-unit");
    let r = result(&s, "Patient/k-cr-unit", "NCT06406205");
    // 0.8 mg/dL on 2026-03-15, then 350 "µmol/l" on 2026-05-25: the newer one converts
    // (350 / 88.4 ≈ 3.96 mg/dL), giving an eGFR far below 45.
    assert_outcome(r, "exc-1", Outcome::Met);
    assert_eq!(r.status, Status::Ineligible);
    assert!(r.decided_by.iter().any(|d| d.id == "exc-1"), "exc-1 decides: {:?}", r.decided_by);
    let c = criterion(r, "exc-1");
    let may = c
        .evidence
        .iter()
        .find(|e| e.resource == "Observation/k-cr-unit-2")
        .unwrap_or_else(|| panic!("exc-1 cites the May creatinine: {}", show(c)));
    assert_eq!(may.date.as_deref(), Some("2026-05-25"), "{}", show(c));
    assert_eq!(may.normalized_unit.as_deref(), Some("mg/dL"), "{}", show(c));
    let v = may.normalized_value.unwrap_or_else(|| panic!("no normalized value: {}", show(c)));
    assert!((v - 3.96).abs() < 0.01, "350 umol/L is about 3.96 mg/dL, got {v}: {}", show(c));
    assert!(
        !c.evidence.iter().any(|e| e.resource == "Observation/k-cr-unit-1"),
        "the older March creatinine is not what the eGFR came from: {}",
        show(c)
    );
}

// ---------------------------------------------------------------- criteria needing review

#[test]
fn asthma_with_prednisone_needs_review_not_exclusion() {
    let s = screen_repro("b-asthma-pred");
    let r = result(&s, "Patient/b-asthma-pred", "NCT06406205");
    // The oral steroid may be for the lupus, not the asthma.
    assert_outcome(r, "exc-7c", Outcome::Manual);
    assert_not_deciding(r, "exc-7c");
}

#[test]
fn gender_other_does_not_fail_contraception_criterion() {
    let s = screen_repro("c-gender-other");
    let r = result(&s, "Patient/c-gender-other", "NCT06406205");
    assert_outcome(r, "inc-7", Outcome::Manual);
    assert_not_deciding(r, "inc-7");
}

#[test]
fn stem_cell_transplant_status_is_not_organ_transplant() {
    let s = screen_repro("d-hsct");
    let r = result(&s, "Patient/d-hsct", "felzartamab-refractory-ln");
    // Z94.84 (stem cell transplant status) is not a solid organ transplant.
    assert_not_outcome(r, "exc-3", Outcome::Met);
    assert_not_deciding(r, "exc-3");
}

#[test]
fn cyclosporine_counts_as_prior_standard_ln_therapy() {
    let s = screen_repro("e-csa");
    let r = result(&s, "Patient/e-csa", "felzartamab-refractory-ln");
    // A standard LN therapy is on record (met), whether it failed is reviewed: manual.
    assert_outcome(r, "inc-6", Outcome::Manual);
    assert_not_deciding(r, "inc-6");
}

#[test]
fn active_order_past_validity_period_is_still_current() {
    let s = screen_repro("h-mmf-validity");
    let r = result(&s, "Patient/h-mmf-validity", "NCT06535412");
    // status active MMF order; dispenseRequest.validityPeriod ended 2026-04-01.
    assert_outcome(r, "inc-4", Outcome::Met);
    assert_not_deciding(r, "inc-4");
}

#[test]
fn old_tb_with_completed_isoniazid_course_is_not_excluded() {
    let s = screen_repro("i-tb-inh");
    let r = result(&s, "Patient/i-tb-inh", "NCT06406205");
    // Z86.15 history of TB, isoniazid prophylaxis taken (2020): never met.
    let c = criterion(r, "exc-6e");
    assert!(
        matches!(c.outcome, Outcome::NotMet | Outcome::Manual),
        "exc-6e must be not-met or manual: {}",
        show(c)
    );
    assert_not_deciding(r, "exc-6e");
}

#[test]
fn topical_tacrolimus_is_not_systemic_immunosuppression() {
    let s = screen_repro("g-topical-tac");
    let r = result(&s, "Patient/g-topical-tac", "belimumab-multitarget-ln");
    assert_not_outcome(r, "exc-4", Outcome::Met);
    assert_not_deciding(r, "exc-4");
}

#[test]
fn clinical_status_text_active_counts_as_active() {
    let s = screen_repro("j-status-text");
    let r = result(&s, "Patient/j-status-text", "NCT06535412");
    // Lupus nephritis with clinicalStatus {text: "Active"} and no coding: active, and exc-1
    // asks for review when met.
    assert_outcome(r, "exc-1", Outcome::Manual);
    assert_not_deciding(r, "exc-1");
}

// ---------------------------------------------------------------- built in the test

#[test]
fn loinc_pathology_report_with_class_iv_conclusion_is_kidney_biopsy() {
    let dir = Scratch::new("loinc-biopsy");
    let p = "rb1";
    let path = dir.write_bundle(
        "bundle.json",
        &[
            json!({ "resourceType": "Patient", "id": p, "gender": "female", "birthDate": "1985-01-01" }),
            active_sle("rb1-sle", p),
            json!({
                "resourceType": "DiagnosticReport",
                "id": "rb1-bx",
                "status": "final",
                "subject": { "reference": format!("Patient/{p}") },
                "code": { "coding": [{
                    "system": "http://loinc.org",
                    "code": "60567-5",
                    "display": "Comprehensive pathology report panel"
                }] },
                "effectiveDateTime": "2026-03-01",
                "conclusionCode": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "36402006" }] }]
            }),
        ],
    );
    let s = screen_path(&path);
    let r = result(&s, "Patient/rb1", "NCT06406205");
    assert_outcome(r, "inc-4a", Outcome::Manual);
    let c = criterion(r, "inc-4a");
    assert!(c.reason.contains("class IV"), "inc-4a reason names class IV: {}", show(c));
}

#[test]
#[cfg(unix)]
fn folder_with_symlink_loop_screens_patient_once() {
    let dir = Scratch::new("symlink-loop");
    let p = "loop1";
    dir.write_bundle(
        "bundle.json",
        &[
            json!({ "resourceType": "Patient", "id": p, "gender": "female", "birthDate": "1985-01-01" }),
            active_sle("loop1-sle", p),
        ],
    );
    std::fs::create_dir(dir.0.join("sub")).unwrap();
    // sub/back -> the folder itself: walking it naively never ends (or ends at ELOOP).
    std::os::unix::fs::symlink(&dir.0, dir.0.join("sub").join("back")).unwrap();
    let cfg = config();
    let s = trialgate::screen(&dir.0, &cfg, Date::parse(AS_OF).unwrap(), &Decisions::default())
        .unwrap_or_else(|e| panic!("screening the folder failed: {e}"));
    assert_eq!(s.patients, 1);
    assert_eq!(s.results.len(), cfg.trials.len(), "one result per trial");
    for r in &s.results {
        assert_eq!(r.patient, "Patient/loop1");
        for c in &r.criteria {
            for (i, e) in c.evidence.iter().enumerate() {
                assert!(!c.evidence[..i].contains(e), "{} {}: duplicated evidence {e:?}", r.trial, c.id);
            }
            // The same Condition read through every level of the loop shows up as a repeated
            // citation in the reason.
            assert!(
                c.reason.matches("Condition/loop1-sle").count() <= 1,
                "{} {}: the SLE condition is cited more than once: {}…",
                r.trial,
                c.id,
                c.reason.chars().take(300).collect::<String>()
            );
        }
    }
    // The bundle is read once, so the Patient is not seen again through the loop.
    let inputs: Vec<&str> = s
        .provenance
        .sources
        .iter()
        .filter(|f| f.kind == "input")
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(inputs.len(), 1, "input files read: {inputs:?}");
    assert!(
        !s.issues.iter().any(|i| i.message.contains("appear more than once")),
        "issues: {:?}",
        s.issues.iter().map(|i| &i.message).collect::<Vec<_>>()
    );
}
