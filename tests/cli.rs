//! End-to-end tests that run the real `trialgate` binary on the shipped fixtures.
//!
//! `fixtures/README.md` tells each fixture patient's story and the verdict expected for trial
//! NCT06406205 (seed 000); the tests below hold the binary to those verdicts, to the evidence
//! behind them, and to the CLI contract (formats, exit codes, error messages, decisions).
//! The demo screening is run once and shared by the tests that only read its JSON.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const TRIAL: &str = "NCT06406205";
const AS_OF: &str = "2026-06-01";
/// The Synthea-style patient has no id: its key is its Bundle fullUrl.
const SYNTHEA: &str = "urn:uuid:8c5d4e1a-3f7b-4a52-9d0e-6b1f2a7c9e31";

/// Listing texts of seed 000 (shared/seeds/000_b6ddcbc4aadd4ea6.txt), verbatim.
const TEXT_INC_2: &str = "Male or female subjects with a minimum age of 18 (or legal age of consent if \\>18 years) to 75 years of age, inclusive, at the time of screening (Visit 1).";
const TEXT_INC_4B: &str = "UPCR of a minimum of ≥1.5 mg/mg for Class III/IV or to a minimum of ≥2 mg/mg for Class V at screening.";
const TEXT_EXC_1: &str = "Estimated glomerular filtration rate (eGFR) as calculated by the Chronic Kidney Disease Epidemiology Collaboration equation of ≤45 mL/minute/1.73 m2 at screening.";

/// Every fixture patient, its expected status for NCT06406205 and the criteria that decide it.
const EXPECTED: &[(&str, &str, &[&str])] = &[
    ("Patient/meilin-zhou", "potentially-eligible", &[]),
    ("Patient/rosa-delgado", "ineligible", &["exc-1"]),
    ("Patient/aisha-bello", "potentially-eligible", &[]),
    ("Patient/grace-okafor", "potentially-eligible", &[]),
    ("Patient/thomas-whitfield", "potentially-eligible", &[]),
    ("Patient/lucia-ferreira", "ineligible", &[]),
    ("Patient/sofia-marquez", "ineligible", &["inc-2"]),
    ("Patient/daniel-cho", "potentially-eligible", &[]),
    ("Patient/priya-raman", "ineligible", &["inc-4b"]),
    (SYNTHEA, "ineligible", &["exc-1"]),
    ("Patient/bulk-0001", "potentially-eligible", &[]),
    ("Patient/bulk-0002", "ineligible", &["exc-1"]),
    ("Patient/bulk-0003", "potentially-eligible", &[]),
];

// ---------------------------------------------------------------------------------------
// Helpers

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn trialgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trialgate"))
        .current_dir(root())
        // The shipped defaults, whatever the developer's shell exports.
        .env_remove("TRIALGATE_MAPPINGS")
        .env_remove("TRIALGATE_TRIALS")
        .env_remove("RUST_LOG")
        .args(args)
        .output()
        .expect("the trialgate binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed by a signal")
}

fn json_of(o: &Output) -> Value {
    assert_eq!(code(o), 0, "exit status; stderr:\n{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", stdout(o)))
}

/// `trialgate screen --bundle fixtures/ --as-of 2026-06-01 --format json`, run once.
fn demo() -> &'static Value {
    static DEMO: OnceLock<Value> = OnceLock::new();
    DEMO.get_or_init(|| {
        json_of(&trialgate(&[
            "screen",
            "--bundle",
            "fixtures/",
            "--as-of",
            AS_OF,
            "--format",
            "json",
        ]))
    })
}

fn results(report: &Value) -> &Vec<Value> {
    report["results"].as_array().expect("`results` is an array")
}

fn result<'a>(report: &'a Value, patient: &str, trial: &str) -> &'a Value {
    let hits: Vec<&Value> = results(report)
        .iter()
        .filter(|r| r["patient"] == patient && r["trial"] == trial)
        .collect();
    assert_eq!(hits.len(), 1, "exactly one result for {patient} x {trial}");
    hits[0]
}

fn r000(patient: &str) -> &'static Value {
    result(demo(), patient, TRIAL)
}

fn criterion<'a>(r: &'a Value, id: &str) -> &'a Value {
    r["criteria"]
        .as_array()
        .expect("`criteria` is an array")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("{}: no criterion {id}", r["patient"]))
}

fn outcome<'a>(r: &'a Value, id: &str) -> &'a str {
    criterion(r, id)["outcome"].as_str().expect("outcome is a string")
}

fn reason<'a>(r: &'a Value, id: &str) -> &'a str {
    criterion(r, id)["reason"].as_str().expect("reason is a string")
}

fn evidence<'a>(r: &'a Value, id: &str, resource: &str) -> &'a Value {
    criterion(r, id)["evidence"]
        .as_array()
        .expect("`evidence` is an array")
        .iter()
        .find(|e| e["resource"] == resource)
        .unwrap_or_else(|| {
            panic!(
                "{} {id}: no evidence from {resource}; evidence: {}",
                r["patient"],
                criterion(r, id)["evidence"]
            )
        })
}

fn fact<'a>(r: &'a Value, name: &str) -> Option<&'a Value> {
    r["facts"]
        .as_array()
        .expect("`facts` is an array")
        .iter()
        .find(|f| f["name"] == name)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol, "{what}: got {got}, want {want} ± {tol}");
}

/// CKD-EPI 2021 creatinine equation (race-free; Inker LA et al., NEJM 2021;385:1737-49),
/// written here independently of the engine:
/// 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^-1.200 × 0.9938^age × 1.012 [female],
/// κ 0.7 (F) / 0.9 (M), α -0.241 (F) / -0.302 (M), Scr in mg/dL.
fn ckd_epi_2021(scr_mg_dl: f64, age: i32, female: bool) -> f64 {
    let (kappa, alpha, sex_factor) = if female { (0.7, -0.241, 1.012) } else { (0.9, -0.302, 1.0) };
    let ratio: f64 = scr_mg_dl / kappa;
    142.0 * ratio.min(1.0).powf(alpha) * ratio.max(1.0).powf(-1.2) * 0.9938f64.powi(age) * sex_factor
}

/// A fresh folder under the system temp dir, unique to this test and process.
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("trialgate-cli-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write temp file");
    p
}

fn loaded_trials(report: &Value) -> BTreeSet<String> {
    report["summary"]["trials"]
        .as_array()
        .expect("summary.trials")
        .iter()
        .map(|t| t["trial"].as_str().expect("trial id").to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The demo screening (JSON)

#[test]
fn demo_screening_gives_every_patient_a_result_for_every_loaded_trial() {
    let report = demo();
    assert_eq!(report["as_of"], AS_OF);
    let patients: BTreeSet<&str> = EXPECTED.iter().map(|(p, _, _)| *p).collect();
    let seen: BTreeSet<&str> = results(report).iter().map(|r| r["patient"].as_str().unwrap()).collect();
    assert_eq!(seen, patients, "the fixture patients, no more and no fewer");
    assert_eq!(report["summary"]["patients"], patients.len());

    let trials = loaded_trials(report);
    assert!(trials.contains(TRIAL), "trial 000 is loaded: {trials:?}");
    let trial_files = report["provenance"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "trial")
        .count();
    assert_eq!(trials.len(), trial_files, "one summary entry per loaded trial file");

    let mut pairs: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in results(report) {
        *pairs
            .entry((r["patient"].as_str().unwrap().into(), r["trial"].as_str().unwrap().into()))
            .or_default() += 1;
    }
    for p in &patients {
        for t in &trials {
            assert_eq!(pairs.get(&(p.to_string(), t.clone())), Some(&1), "one result for {p} x {t}");
        }
    }
    assert_eq!(results(report).len(), patients.len() * trials.len());
}

/// `person` carries the official name and the MRN (an identifier typed MR in v2-0203) for
/// staff; it is absent when the Patient has neither, and nothing is guessed.
#[test]
fn results_name_the_person_with_the_official_name_and_the_mrn() {
    let r = r000("Patient/meilin-zhou");
    assert_eq!(r["person"], serde_json::json!({"name": "Mei Lin Zhou", "mrn": "SH-204417"}));
    let r = r000("Patient/bulk-0001");
    assert_eq!(r["person"], serde_json::json!({"name": "Ka Yan Wong", "mrn": "HK-000231"}));
    // Synthea's MRN is typed MR too; the name drops the prefix.
    let r = r000("urn:uuid:8c5d4e1a-3f7b-4a52-9d0e-6b1f2a7c9e31");
    assert_eq!(r["person"]["name"], "Marisol467 Reyes693");
    for r in results(demo()) {
        assert!(
            r["person"]["name"].is_string(),
            "{}: every fixture patient has a name",
            r["patient"]
        );
    }
    // A Patient without a name or a typed MRN has no `person`.
    let dir = temp_dir("person");
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource":
        {"resourceType": "Patient", "id": "anon", "gender": "female", "birthDate": "1990-01-01",
         "identifier": [{"system": "urn:oid:1.2.3", "value": "12345"}]}}]});
    let file = write(&dir, "anon.json", &bundle.to_string());
    let report = json_of(&trialgate(&[
        "screen",
        "--bundle",
        file.to_str().unwrap(),
        "--as-of",
        AS_OF,
        "--format",
        "json",
    ]));
    assert!(results(&report).iter().all(|r| r.get("person").is_none()), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nct06406205_status_and_deciding_criteria_of_each_fixture_patient() {
    let listing: BTreeMap<&str, &str> = [("inc-2", TEXT_INC_2), ("inc-4b", TEXT_INC_4B), ("exc-1", TEXT_EXC_1)].into();
    for (patient, status, deciding) in EXPECTED {
        let r = r000(patient);
        assert_eq!(r["status"], *status, "{patient}: status");
        let ids: Vec<&str> = r["decided_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, *deciding, "{patient}: decided_by");
        for d in r["decided_by"].as_array().unwrap() {
            let id = d["id"].as_str().unwrap();
            assert_eq!(
                d["text"],
                criterion(r, id)["text"],
                "{patient} {id}: decided_by text is the criterion's text"
            );
            assert_eq!(d["text"], listing[id], "{patient} {id}: the listing's words, verbatim");
            let o = outcome(r, id);
            let kind = criterion(r, id)["kind"].as_str().unwrap();
            assert!(
                (kind == "inclusion" && o == "not-met") || (kind == "exclusion" && o == "met"),
                "{patient} {id}: a deciding {kind} criterion cannot be {o}"
            );
        }
        if *status != "ineligible" {
            assert!(r.get("record").is_none(), "{patient}: no record problem");
        }
    }
}

#[test]
fn meilin_zhou_meets_every_computable_criterion_and_leaves_only_manual_items() {
    let r = r000("Patient/meilin-zhou");
    let want: BTreeMap<&str, &str> = [
        ("inc-1", "manual"),
        ("inc-2", "met"),
        ("inc-3", "manual"),
        ("inc-4a", "manual"),
        ("inc-4b", "met"),
        ("inc-4c", "met"),
        ("inc-5", "manual"),
        ("inc-6", "manual"),
        ("inc-7", "manual"),
        ("exc-1", "not-met"),
        ("exc-2", "manual"),
        ("exc-3", "manual"),
        ("exc-4", "manual"),
        ("exc-5", "manual"),
        ("exc-6a", "not-met"),
        ("exc-6b", "not-met"),
        ("exc-6c", "manual"),
        ("exc-6d", "not-met"),
        ("exc-6e", "not-met"),
        ("exc-7a", "manual"),
        ("exc-7b", "not-met"),
        ("exc-7c", "not-met"),
        ("exc-7d", "not-met"),
        ("exc-7e", "manual"),
        ("exc-7f", "not-met"),
        ("exc-8", "not-met"),
        ("exc-9", "not-met"),
        ("exc-10", "manual"),
        ("exc-11", "not-met"),
        ("exc-12", "manual"),
        ("exc-13", "manual"),
        ("exc-14", "manual"),
    ]
    .into();
    let got: BTreeMap<&str, &str> = r["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(got, want);

    // The biopsy: a DiagnosticReport coded with the biopsy procedure, class IV in conclusionCode.
    let biopsy = evidence(r, "inc-4b", "DiagnosticReport/meilin-biopsy-report");
    assert_eq!(biopsy["note"], "class IV");
    assert_eq!(biopsy["date"], "2026-03-20T01:30:00Z", "09:30 at +08:00, in UTC");
    let upcr = evidence(r, "inc-4b", "Observation/meilin-upcr-20260512");
    assert_eq!(num(&upcr["normalized_value"]), 2.3);
    assert_eq!(upcr["normalized_unit"], "mg/mg");

    let egfr = evidence(r, "exc-1", "Observation/meilin-egfr-20260512");
    assert_eq!(num(&egfr["normalized_value"]), 72.0);
    assert_eq!(egfr["code"], "loinc|98979-8");
    assert_eq!(num(&fact(r, "egfr").expect("egfr fact")["value"]), 72.0);
    assert_eq!(num(&fact(r, "age").expect("age fact")["value"]), 34.0);
    // A negative serum hCG (SNOMED 260385009 in valueCodeableConcept).
    assert_eq!(fact(r, "hcg-serum").expect("hcg-serum fact")["value"], "negative");
}

#[test]
fn rosa_delgado_is_excluded_by_egfr_38_with_its_evidence() {
    let r = r000("Patient/rosa-delgado");
    assert_eq!(outcome(r, "exc-1"), "met");
    assert_eq!(criterion(r, "exc-1")["text"], TEXT_EXC_1);
    let e = evidence(r, "exc-1", "Observation/rosa-egfr-20260505");
    assert_eq!(num(&e["value"]), 38.0);
    assert_eq!(num(&e["normalized_value"]), 38.0);
    assert_eq!(e["normalized_unit"], "mL/min/{1.73_m2}");
    assert_eq!(e["date"], "2026-05-05T14:40:00Z", "09:40 at -05:00, in UTC");
    // Everything else that decides is fine: UPCR 3100 mg/g = 3.1 mg/mg with class III+V.
    assert_eq!(outcome(r, "inc-4b"), "met");
    let upcr = evidence(r, "inc-4b", "Observation/rosa-upcr-20260505");
    assert_close(num(&upcr["normalized_value"]), 3.1, 1e-9, "3100 mg/g in mg/mg");
    assert_eq!(evidence(r, "inc-4b", "DiagnosticReport/rosa-biopsy-report")["note"], "class III+V");
}

#[test]
fn aisha_bello_ignored_records_do_not_count() {
    let r = r000("Patient/aisha-bello");
    assert_eq!(r["status"], "potentially-eligible");
    // The entered-in-error eGFR 31 (newer) is ignored; the valid eGFR 64 decides.
    assert_eq!(outcome(r, "exc-1"), "not-met");
    assert_eq!(
        num(&evidence(r, "exc-1", "Observation/aisha-egfr-20260502")["normalized_value"]),
        64.0
    );
    // The refuted HIV diagnosis does not exclude.
    assert_eq!(outcome(r, "exc-6d"), "not-met");
    // The pregnancy resolved in 2025 does not exclude (and both hCG tests are negative).
    assert_eq!(outcome(r, "exc-11"), "not-met");
    // The preliminary ALT 310 U/L is ignored; the final ALT 28 (ULN 40) decides.
    assert_eq!(outcome(r, "exc-7b"), "not-met");
    assert_eq!(num(&fact(r, "alt_x_uln").expect("alt_x_uln")["value"]), 0.7);
    let text = r.to_string();
    for ignored in ["aisha-egfr-20260509-eie", "aisha-alt-20260520-prelim", "aisha-hiv-refuted"] {
        assert!(!text.contains(ignored), "{ignored} must not be cited anywhere in the result");
    }
}

#[test]
fn grace_okafor_alt_at_3_25_times_uln_is_flagged_for_review() {
    // exc-7b reads "≥2.5 × ULN at screening and, if abnormal at screening, then confirmed that
    // the levels have returned to <2.5 × ULN before randomization": the trial file marks a met
    // exc-7b `review_if_met`, so it is a manual item (with the ratio), not an exclusion.
    let r = r000("Patient/grace-okafor");
    assert_eq!(outcome(r, "exc-7b"), "manual");
    assert!(
        reason(r, "exc-7b").contains("alt 130 U/L on 2026-05-19 = 3.25 × ULN (ULN 40"),
        "{}",
        reason(r, "exc-7b")
    );
    let alt = evidence(r, "exc-7b", "Observation/grace-alt-20260519");
    assert_eq!(num(&alt["normalized_value"]), 130.0);
    assert!(alt["note"].as_str().unwrap().contains("ratio 3.25"), "{}", alt["note"]);
    assert_eq!(num(&fact(r, "alt_x_uln").expect("alt_x_uln")["value"]), 3.25);
    // Bilirubin in umol/L against a referenceRange in umol/L.
    assert_close(
        num(&fact(r, "bilirubin_x_uln").expect("bilirubin_x_uln")["value"]),
        12.0 / 21.0,
        1e-9,
        "bilirubin / ULN",
    );
    assert_eq!(r["status"], "potentially-eligible");
}

#[test]
fn thomas_whitfield_si_units_oid_systems_and_derived_egfr() {
    let r = r000("Patient/thomas-whitfield");
    // WHO ICD-10 M32.1 is SLE.
    assert_eq!(evidence(r, "inc-3", "Condition/thomas-sle")["code"], "icd10|M32.1");
    // UPCR 220 mg/mmol (LOINC as urn:oid:2.16.840.1.113883.6.1) = 220 / 113.12 mg/mg.
    let upcr = evidence(r, "inc-4b", "Observation/thomas-upcr-20260518");
    assert_eq!(num(&upcr["value"]), 220.0);
    assert_eq!(upcr["unit"], "mg/mmol");
    assert_close(num(&upcr["normalized_value"]), 220.0 / 113.12, 1e-9, "UPCR mg/mmol -> mg/mg");
    assert_eq!(upcr["normalized_unit"], "mg/mg");
    // Class III from a conclusionCode in the SNOMED OID system; >= 1.5 mg/mg.
    assert_eq!(evidence(r, "inc-4b", "DiagnosticReport/thomas-biopsy-report")["note"], "class III");
    assert_eq!(outcome(r, "inc-4b"), "met");
    // The biopsy is 8 months old: inc-4c needs a person.
    assert_eq!(outcome(r, "inc-4c"), "manual");

    // No eGFR reported: derived by CKD-EPI 2021 from creatinine 106 umol/L (male, 38).
    assert_eq!(outcome(r, "exc-1"), "not-met");
    assert!(reason(r, "exc-1").contains("CKD-EPI 2021"), "{}", reason(r, "exc-1"));
    assert!(reason(r, "exc-1").contains("(derived)"), "{}", reason(r, "exc-1"));
    let scr_mg_dl = 106.0 / 88.4;
    let creat = evidence(r, "exc-1", "Observation/thomas-creat-20260518");
    assert_eq!(num(&creat["value"]), 106.0);
    assert_eq!(creat["unit"], "umol/L");
    assert_close(num(&creat["normalized_value"]), scr_mg_dl, 1e-9, "creatinine umol/L -> mg/dL");
    let egfr = fact(r, "egfr").expect("a derived egfr fact");
    let want = ckd_epi_2021(scr_mg_dl, 38, false);
    assert_close(want, 79.45, 0.01, "independent CKD-EPI 2021 (sanity)");
    assert_close(num(&egfr["value"]), want, 0.01, "derived eGFR");
    assert_eq!(egfr["derived_from"], serde_json::json!(["Observation/thomas-creat-20260518"]));

    // Counts in /uL and K/uL are normalized to 10*9/L.
    let plt = evidence(r, "exc-7d", "Observation/thomas-plt-20260518");
    assert_eq!(plt["unit"], "/uL");
    assert_eq!(num(&plt["normalized_value"]), 182.0);
    let wbc = evidence(r, "exc-7d", "Observation/thomas-wbc-20260518");
    assert_eq!(wbc["unit"], "K/uL");
    assert_eq!(num(&wbc["normalized_value"]), 4.9);
    assert_eq!(outcome(r, "exc-7d"), "not-met");
    // IU/L and µmol/L are read through the unit aliases.
    assert_eq!(outcome(r, "exc-7b"), "not-met");
}

#[test]
fn ckd_epi_2021_reference_implementation_matches_published_values() {
    // NKF calculator values quoted in shared/research/codes.md section 4 (S11).
    assert_eq!(ckd_epi_2021(1.09, 55, false).round(), 80.0);
    assert_eq!(ckd_epi_2021(1.2, 55, false).round(), 71.0);
    assert_close(ckd_epi_2021(1.5, 50, true), 42.2, 0.05, "1.5 mg/dL, 50 y, F");
}

#[test]
fn lucia_ferreira_deceased_is_ineligible_on_the_record() {
    let r = r000("Patient/lucia-ferreira");
    assert_eq!(r["status"], "ineligible");
    assert_eq!(r["record"], "deceased (2026-02-11T03:20:00-03:00)");
    // And for every other loaded trial too.
    for t in loaded_trials(demo()) {
        let r = result(demo(), "Patient/lucia-ferreira", &t);
        assert_eq!(r["status"], "ineligible", "{t}");
        assert!(
            r["record"].as_str().is_some_and(|s| s.starts_with("deceased")),
            "{t}: {}",
            r["record"]
        );
    }
}

#[test]
fn sofia_marquez_is_16_out_of_range_and_egfr_is_not_derived() {
    let r = r000("Patient/sofia-marquez");
    assert_eq!(outcome(r, "inc-2"), "not-met");
    assert_eq!(criterion(r, "inc-2")["text"], TEXT_INC_2);
    assert!(reason(r, "inc-2").starts_with("age 16 at 2026-06-01"), "{}", reason(r, "inc-2"));
    assert_eq!(num(&fact(r, "age").expect("age")["value"]), 16.0);
    // Creatinine 0.62 mg/dL is there, but CKD-EPI 2021 is for adults only.
    assert_eq!(outcome(r, "exc-1"), "unknown");
    assert!(reason(r, "exc-1").contains("not derived"), "{}", reason(r, "exc-1"));
    assert!(reason(r, "exc-1").contains("16"), "{}", reason(r, "exc-1"));
    assert!(fact(r, "egfr").is_none(), "no eGFR may be derived for a 16-year-old");
}

#[test]
fn daniel_cho_egfr_in_ml_min_is_unknown_and_listed_as_unmapped() {
    let r = r000("Patient/daniel-cho");
    assert_eq!(outcome(r, "exc-1"), "unknown");
    assert!(reason(r, "exc-1").contains("`mL/min`"), "the unit is named: {}", reason(r, "exc-1"));
    let e = evidence(r, "exc-1", "Observation/daniel-egfr-20260527");
    assert_eq!(e["unit"], "mL/min");
    assert!(e.get("normalized_value").is_none(), "no normalized value for an unconvertible unit");
    let unmapped = demo()["unmapped"].as_array().expect("unmapped");
    let hit = unmapped
        .iter()
        .find(|u| u["code"] == "98979-8" && u["unit"] == "mL/min")
        .unwrap_or_else(|| panic!("98979-8 in mL/min is listed as unmapped: {unmapped:?}"));
    assert_eq!(hit["count"], 1);
}

#[test]
fn priya_raman_bounds_from_comparator_and_value_string() {
    let r = r000("Patient/priya-raman");
    // eGFR valueQuantity {comparator: ">", value: 90}: certainly not <= 45.
    assert_eq!(outcome(r, "exc-1"), "not-met");
    let egfr = evidence(r, "exc-1", "Observation/priya-egfr-20260514");
    assert_eq!(num(&egfr["normalized_value"]), 90.0);
    assert!(reason(r, "exc-1").contains("≥90"), "{}", reason(r, "exc-1"));
    // UPCR valueString "<0.2": certainly not >= 1.5 mg/mg, whatever the class.
    assert_eq!(outcome(r, "inc-4b"), "not-met");
    let upcr = evidence(r, "inc-4b", "Observation/priya-upcr-20260514");
    assert_eq!(upcr["value"], "<0.2");
    assert_eq!(num(&upcr["normalized_value"]), 0.2);
    assert!(reason(r, "inc-4b").contains("≤0.2"), "{}", reason(r, "inc-4b"));
}

#[test]
fn synthea_transaction_resolves_urn_uuid_references_and_derives_egfr() {
    let r = r000(SYNTHEA);
    // The patient key is its fullUrl; the evidence names resources by fullUrl.
    assert_eq!(r["patient"], SYNTHEA);
    assert_eq!(evidence(r, "inc-2", SYNTHEA)["date"], "1968-04-22");
    assert_eq!(
        evidence(r, "inc-3", "urn:uuid:5f3a9c1e-2d4b-4e7f-a8c6-1b0d9e2f3a64")["code"],
        "snomed|55464009"
    );
    // Only an MDRD eGFR (33914-3) is reported; exc-1 names CKD-EPI, so it is derived from
    // creatinine 1.9 mg/dL (female, 58 at the test): 30.2, an exclusion.
    assert_eq!(outcome(r, "exc-1"), "met");
    let creat = evidence(r, "exc-1", "urn:uuid:3d7f1a9c-5e2b-4c8d-a6f0-7b1e3c5d9a12");
    assert_eq!(num(&creat["normalized_value"]), 1.9);
    let want = ckd_epi_2021(1.9, 58, true);
    assert_close(want, 30.23, 0.01, "independent CKD-EPI 2021 (sanity)");
    assert_close(num(&fact(r, "egfr").expect("derived egfr")["value"]), want, 0.01, "derived eGFR");
    assert!(
        reason(r, "exc-1").contains("mdrd"),
        "the unused MDRD value is mentioned: {}",
        reason(r, "exc-1")
    );
    // Encounter, Organization, Claim and ExplanationOfBenefit are skipped silently, and every
    // urn:uuid reference resolved (no orphans).
    for i in demo()["input_issues"].as_array().unwrap() {
        let m = i["message"].as_str().unwrap();
        assert!(
            !m.contains("not in the input") && !m.contains("no subject"),
            "unexpected issue: {i}"
        );
        assert!(!i["location"].as_str().unwrap().contains("synthea"), "unexpected issue: {i}");
    }
}

#[test]
fn malformed_ndjson_line_is_reported_with_file_and_line_and_nothing_else_is_lost() {
    let ndjson = std::fs::read_to_string(root().join("fixtures/bulk/Observation.ndjson")).unwrap();
    let bad: Vec<usize> = ndjson
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && serde_json::from_str::<Value>(l).is_err())
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(bad, vec![7], "the fixture has exactly one truncated line");

    let issues = demo()["input_issues"].as_array().expect("input_issues");
    assert_eq!(issues.len(), 1, "only the truncated line is a problem: {issues:?}");
    assert_eq!(issues[0]["location"], "fixtures/bulk/Observation.ndjson:7");
    assert!(issues[0]["message"].as_str().unwrap().contains("not valid JSON"), "{}", issues[0]);

    // The three bulk patients are all screened; lines after the broken one are read.
    for p in ["Patient/bulk-0001", "Patient/bulk-0002", "Patient/bulk-0003"] {
        assert!(r000(p)["status"].is_string(), "{p}");
    }
    let b2 = r000("Patient/bulk-0002");
    assert_eq!(outcome(b2, "exc-1"), "met");
    let e = evidence(b2, "exc-1", "Observation/bulk-0002-egfr");
    assert_eq!(
        e["unit"], "mL/min/1.73m2",
        "a unit string without a UCUM code, read through the aliases"
    );
    assert_eq!(num(&e["normalized_value"]), 44.0);
    assert_eq!(num(&evidence(b2, "exc-7b", "Observation/bulk-0002-alt")["normalized_value"]), 41.0);
    let b3 = r000("Patient/bulk-0003");
    assert_eq!(num(&evidence(b3, "exc-1", "Observation/bulk-0003-egfr")["normalized_value"]), 67.0);
    // bulk-0001: UPCR 1800 mg/g, eGFR by CKD-EPI 2009 (accepted: the criterion names CKD-EPI).
    let b1 = r000("Patient/bulk-0001");
    assert_eq!(outcome(b1, "exc-1"), "not-met");
    assert_eq!(evidence(b1, "exc-1", "Observation/bulk-0001-egfr")["code"], "loinc|62238-1");
}

#[test]
fn provenance_names_version_config_hash_and_sources() {
    let p = &demo()["provenance"];
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    let hash = p["config_hash"].as_str().expect("config_hash");
    assert_eq!(hash.len(), 64, "{hash}");
    assert!(hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{hash}");
    let sources = p["sources"].as_array().expect("sources");
    let of_kind = |k: &str| sources.iter().filter(|s| s["kind"] == k).collect::<Vec<_>>();
    assert!(
        of_kind("trial")
            .iter()
            .any(|s| s["path"].as_str().unwrap().ends_with("000-NCT06406205.yaml")),
        "{sources:?}"
    );
    assert!(
        of_kind("mapping")
            .iter()
            .any(|s| s["path"].as_str().unwrap().ends_with("labs.yaml")),
        "{sources:?}"
    );
    for s in of_kind("trial").into_iter().chain(of_kind("mapping")) {
        let h = s["sha256"].as_str().unwrap();
        assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()), "{s}");
    }
}

#[test]
fn screening_is_deterministic_byte_for_byte() {
    let args = ["screen", "--bundle", "fixtures/", "--as-of", AS_OF, "--format", "json"];
    let (a, b) = (trialgate(&args), trialgate(&args));
    assert_eq!(code(&a), 0);
    assert!(a.stdout == b.stdout, "two runs on the same input and date differ");
}

// ---------------------------------------------------------------------------------------
// Where the current behaviour is, in our reading, wrong (see the report that came with
// these tests): the test asserts what the listing means.

#[test]
fn nct06406205_pregnancy_exclusion_does_not_apply_to_a_man() {
    // exc-11 reads "Women who are pregnant or breastfeeding." Thomas is male: the exclusion
    // cannot apply to him, so it is not met. The trial file's rule has no sex branch, so a man
    // without a (female) pregnancy test comes out `unknown` and lands on a review list.
    let r = r000("Patient/thomas-whitfield");
    assert_eq!(outcome(r, "exc-11"), "not-met", "{}", reason(r, "exc-11"));
}

/// Screens one ad-hoc Bundle (written to a temp folder) against NCT06406205.
fn screen_one(tag: &str, bundle: &Value) -> Value {
    let dir = temp_dir(tag);
    let file = write(&dir, "bundle.json", &serde_json::to_string_pretty(bundle).unwrap());
    let v = json_of(&trialgate(&[
        "screen",
        "--bundle",
        file.to_str().unwrap(),
        "--as-of",
        AS_OF,
        "--trial",
        TRIAL,
        "--format",
        "json",
    ]));
    let _ = std::fs::remove_dir_all(&dir);
    v
}

#[test]
fn condition_without_clinical_status_does_not_decide_an_active_condition_exclusion() {
    // An encounter diagnosis of heart failure from 2019 with no clinicalStatus (allowed by R4
    // for encounter diagnoses). Whether it is active now is not recorded, so the exclusion
    // "congestive heart failure" (exc-7a, a `condition` rule that needs an active condition)
    // must not be `met`: shared/research/codes.md 2.2 "a missing clinicalStatus gives
    // `unknown`", and DESIGN invariant 3 (missing data never gives a silent met/not-met).
    let bundle = serde_json::json!({
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "hf-nostatus", "gender": "female", "birthDate": "1986-02-10"}},
            {"resource": {"resourceType": "Condition", "id": "sle",
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "55464009"}]},
                "subject": {"reference": "Patient/hf-nostatus"}, "onsetDateTime": "2015-03-01"}},
            {"resource": {"resourceType": "Condition", "id": "hf-2019",
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}],
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84114007", "display": "Heart failure"}]},
                "subject": {"reference": "Patient/hf-nostatus"}, "recordedDate": "2019-05-01"}}
        ]
    });
    let v = screen_one("nostatus", &bundle);
    let r = result(&v, "Patient/hf-nostatus", TRIAL);
    assert_ne!(outcome(r, "exc-7a"), "met", "{}", reason(r, "exc-7a"));
    assert_eq!(r["status"], "potentially-eligible");
}

#[test]
fn quantity_code_from_a_non_ucum_system_falls_back_to_the_unit_string() {
    // Quantity.code is a unit code *in Quantity.system*. Here the feed codes the unit in SNOMED
    // CT (258814008 micromole/liter) and spells it `umol/L` in Quantity.unit. Only a UCUM code
    // (or a code without a system) can be looked up in the unit tables; otherwise the unit
    // string must be used. Today the SNOMED code is taken as the unit, the creatinine is
    // unconvertible and eGFR cannot be derived.
    let bundle = serde_json::json!({
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "unit-coded", "gender": "male", "birthDate": "1987-11-03"}},
            {"resource": {"resourceType": "Observation", "id": "creat", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "14682-9"}]},
                "subject": {"reference": "Patient/unit-coded"},
                "effectiveDateTime": "2026-05-18T07:30:00+01:00",
                "valueQuantity": {"value": 106, "unit": "umol/L", "system": "http://snomed.info/sct", "code": "258814008"}}}
        ]
    });
    let v = screen_one("unitcode", &bundle);
    let r = result(&v, "Patient/unit-coded", TRIAL);
    assert_eq!(outcome(r, "exc-1"), "not-met", "{}", reason(r, "exc-1"));
    let want = ckd_epi_2021(106.0 / 88.4, 38, false);
    assert_close(num(&fact(r, "egfr").expect("derived egfr")["value"]), want, 0.01, "derived eGFR");
}

// ---------------------------------------------------------------------------------------
// Other formats

#[test]
fn csv_has_one_row_per_patient_and_trial() {
    let o = trialgate(&["screen", "--bundle", "fixtures/", "--as-of", AS_OF, "--format", "csv"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    let mut lines = text.lines();
    let header = lines.next().expect("a header");
    assert!(header.starts_with("patient,trial,status"), "{header}");
    let rows: Vec<Vec<&str>> = lines.filter(|l| !l.is_empty()).map(|l| l.splitn(5, ',').collect()).collect();
    let trials = loaded_trials(demo());
    assert_eq!(rows.len(), EXPECTED.len() * trials.len());
    for (patient, status, deciding) in EXPECTED {
        let row = rows
            .iter()
            .find(|r| r[0] == *patient && r[1] == TRIAL)
            .unwrap_or_else(|| panic!("no CSV row for {patient}"));
        assert_eq!(row[2], *status, "{patient}");
        if !deciding.is_empty() {
            assert_eq!(row[3], deciding.join(" "), "{patient}: decided_by column");
        }
    }
    let lucia = rows.iter().find(|r| r[0] == "Patient/lucia-ferreira" && r[1] == TRIAL).unwrap();
    assert!(lucia[3].starts_with("record: deceased"), "{:?}", lucia);
}

#[test]
fn text_report_names_every_patient_and_the_excluded_one_is_ineligible() {
    let o = trialgate(&["screen", "--bundle", "fixtures/", "--as-of", AS_OF, "--format", "text"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = stdout(&o);
    for (patient, _, _) in EXPECTED {
        assert!(text.lines().any(|l| l == *patient), "{patient} has its own heading line");
    }
    // Rosa's block: the 000 line says INELIGIBLE and shows exc-1.
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "Patient/rosa-delgado")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect();
    let line = block
        .iter()
        .find(|l| l.trim_start().starts_with(TRIAL))
        .expect("a 000 line for Rosa");
    assert!(line.contains("INELIGIBLE"), "{line}");
    assert!(block.iter().any(|l| l.contains("✗ exc-1")), "{block:?}");
    assert!(text.contains("fixtures/bulk/Observation.ndjson:7"), "the input problem is listed");
}

#[test]
fn trial_option_limits_the_screening_to_that_trial() {
    let v = json_of(&trialgate(&[
        "screen",
        "--bundle",
        "fixtures/bundles",
        "--as-of",
        AS_OF,
        "--trial",
        TRIAL,
        "--format",
        "json",
    ]));
    assert_eq!(loaded_trials(&v), BTreeSet::from([TRIAL.to_string()]));
    assert_eq!(results(&v).len(), 9, "nine patients in fixtures/bundles, one trial");
    assert_eq!(result(&v, "Patient/rosa-delgado", TRIAL)["status"], "ineligible");
}

// ---------------------------------------------------------------------------------------
// Decisions

#[test]
fn decisions_answer_manual_items_until_they_expire_and_never_override_data() {
    let dir = temp_dir("decisions");
    let file = write(
        &dir,
        "decisions.yaml",
        "- patient: Patient/meilin-zhou\n  trial: NCT06406205\n  criterion: inc-1\n  answer: met\n  by: J. Cobb\n  at: 2026-05-20\n\
         - patient: Patient/meilin-zhou\n  trial: NCT06406205\n  criterion: inc-6\n  answer: met\n  by: J. Cobb\n  at: 2026-04-01\n  expires: 2026-05-01\n\
         - patient: Patient/rosa-delgado\n  trial: NCT06406205\n  criterion: exc-1\n  answer: not-met\n  by: J. Cobb\n  at: 2026-05-20\n  note: repeat eGFR pending\n",
    );
    let v = json_of(&trialgate(&[
        "screen",
        "--bundle",
        "fixtures/bundles",
        "--as-of",
        AS_OF,
        "--trial",
        TRIAL,
        "--format",
        "json",
        "--decisions",
        file.to_str().unwrap(),
    ]));
    // The decisions file changes outcomes, so the report names it with its hash; inputs are
    // named with their size.
    let sources = v["provenance"]["sources"].as_array().expect("sources");
    let d = sources
        .iter()
        .find(|s| s["kind"] == "decisions")
        .expect("decisions file in provenance");
    assert_eq!(d["path"], file.to_str().unwrap());
    assert_eq!(d["sha256"].as_str().map(str::len), Some(64));
    let input = sources.iter().find(|s| s["kind"] == "input").expect("an input in provenance");
    assert!(input["bytes"].as_u64().is_some_and(|b| b > 0), "{input}");
    assert!(input.get("sha256").is_none(), "inputs are not hashed: {input}");
    let mei = result(&v, "Patient/meilin-zhou", TRIAL);
    // In force: inc-1 (consent) becomes met, with who and when.
    let inc1 = criterion(mei, "inc-1");
    assert_eq!(inc1["outcome"], "met");
    assert_eq!(inc1["decision"]["answer"], "met");
    assert_eq!(inc1["decision"]["by"], "J. Cobb");
    assert_eq!(inc1["decision"]["at"], "2026-05-20");
    assert!(inc1["reason"].as_str().unwrap().contains("J. Cobb"), "{}", inc1["reason"]);
    // Expired before the screening date: not applied.
    let inc6 = criterion(mei, "inc-6");
    assert_eq!(inc6["outcome"], "manual");
    assert!(inc6.get("decision").is_none(), "expired decision applied: {inc6}");
    // Data decided exc-1 for Rosa: a note does not override it.
    let rosa = result(&v, "Patient/rosa-delgado", TRIAL);
    assert_eq!(outcome(rosa, "exc-1"), "met");
    assert!(criterion(rosa, "exc-1").get("decision").is_none());
    assert_eq!(rosa["status"], "ineligible");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Bad input and configuration: exit status 2 and a message that names the culprit

#[test]
fn nonexistent_bundle_path_exits_2_naming_the_path() {
    let o = trialgate(&["screen", "--bundle", "fixtures/no-such-dir", "--as-of", AS_OF]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("fixtures/no-such-dir"), "{}", stderr(&o));
    assert!(o.stdout.is_empty(), "no report on stdout");
}

#[test]
fn impossible_as_of_date_exits_2() {
    let o = trialgate(&["screen", "--bundle", "fixtures/", "--as-of", "2026-13-45"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("2026-13-45"), "{}", stderr(&o));
}

#[test]
fn unknown_trial_id_exits_2_naming_it() {
    let o = trialgate(&["screen", "--bundle", "fixtures/", "--as-of", AS_OF, "--trial", "no-such-trial"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no-such-trial"), "{}", stderr(&o));
}

#[test]
fn check_rejects_a_trial_with_an_unknown_lab_naming_file_and_criterion() {
    let dir = temp_dir("badlab");
    let file = write(
        &dir,
        "typo-trial.yaml",
        "id: TG-TYPO\ntitle: A trial file with a typo\nsource: tests/cli.rs\ncriteria:\n  - id: exc-typo\n    kind: exclusion\n    text: \"eGFR of ≤45 mL/minute/1.73 m2 at screening.\"\n    rule: {lab: egfrr, op: \"<=\", value: 45, unit: \"mL/min/{1.73_m2}\"}\n",
    );
    let o = trialgate(&["check", "--trial", file.to_str().unwrap()]);
    assert_eq!(code(&o), 2, "stdout: {}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("typo-trial.yaml"), "{err}");
    assert!(err.contains("exc-typo"), "{err}");
    assert!(err.contains("egfrr"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_accepts_the_shipped_configuration() {
    let o = trialgate(&["check"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("ok"), "{}", stdout(&o));
}

#[test]
fn help_of_screen_and_check_shows_examples() {
    for sub in ["screen", "sweep", "daemon", "serve", "check"] {
        let o = trialgate(&[sub, "--help"]);
        assert_eq!(code(&o), 0, "{sub}");
        assert!(stdout(&o).contains("Example"), "{sub} --help:\n{}", stdout(&o));
    }
}

// ---------------------------------------------------------------------------------------
// Medication resolution, probed with a one-criterion trial written for the test

#[test]
fn medications_resolve_through_codes_contained_and_bundle_references() {
    let dir = temp_dir("probe");
    let file = write(
        &dir,
        "probe.yaml",
        "id: TG-PROBE\ntitle: Medication probe\nsource: tests/cli.rs\ncriteria:\n  - id: on-mmf\n    kind: inclusion\n    text: \"Currently taking mycophenolate.\"\n    rule: {medication: mycophenolate, current: true}\n",
    );
    let v = json_of(&trialgate(&[
        "screen",
        "--bundle",
        "fixtures/",
        "--as-of",
        AS_OF,
        "--trial",
        file.to_str().unwrap(),
        "--format",
        "json",
    ]));
    // Synthea: medicationReference to a Medication entry of the same transaction Bundle.
    let syn = result(&v, SYNTHEA, "TG-PROBE");
    assert_eq!(outcome(syn, "on-mmf"), "met", "{}", reason(syn, "on-mmf"));
    assert_eq!(
        evidence(syn, "on-mmf", "urn:uuid:2c4e6a8b-0d2f-4e6a-9c1e-5b7d9f1a3c40")["code"],
        "rxnorm|200060"
    );
    // Contained Medication (`#med-mmf`), a code in medicationCodeableConcept, a MedicationStatement.
    for (p, res) in [
        ("Patient/thomas-whitfield", "MedicationRequest/thomas-mmf"),
        ("Patient/meilin-zhou", "MedicationRequest/meilin-mmf"),
        ("Patient/rosa-delgado", "MedicationStatement/rosa-mmf"),
    ] {
        let r = result(&v, p, "TG-PROBE");
        assert_eq!(outcome(r, "on-mmf"), "met", "{p}: {}", reason(r, "on-mmf"));
        evidence(r, "on-mmf", res);
    }
    // Grace takes azathioprine (stopped), not mycophenolate.
    assert_eq!(outcome(result(&v, "Patient/grace-okafor", "TG-PROBE"), "on-mmf"), "not-met");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A report written to a file appears whole under its name (never half of one), and stderr
/// ends with a summary: patients, input size, time, problems, and counts per trial.
#[test]
fn a_report_file_appears_whole_and_stderr_summarizes_the_run() {
    let dir = std::env::temp_dir().join(format!("trialgate-cli-summary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("verdicts.csv");
    let o = trialgate(&[
        "screen",
        "--bundle",
        "fixtures/bundles",
        "--as-of",
        "2026-06-01",
        "--format",
        "csv",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("screen: 9 patient(s)"), "{err}");
    assert!(
        err.contains("NCT06406205: 0 eligible, 5 potentially eligible, 4 ineligible"),
        "{err}"
    );
    let csv = std::fs::read_to_string(&out).unwrap();
    assert_eq!(csv.lines().count(), 1 + 9 * 5);
    assert!(!dir.join("verdicts.csv.partial").exists());

    // A run that fails once the report is open (a folder with no FHIR files) leaves neither
    // the report nor a partial one.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = dir.join("nothing.csv");
    let o = trialgate(&["screen", "--bundle", empty.to_str().unwrap(), "-o", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!missing.exists() && !dir.join("nothing.csv.partial").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--format html` is the coordinator's page: per trial, every patient by name and MRN with
/// the status, the deciding criteria and what is unknown, candidates first, ineligible ones
/// hidden until asked for, and text from the data escaped. `screen` has no history: nobody is
/// marked newly eligible.
#[test]
fn the_html_page_lists_every_patient_per_trial_with_the_reasons() {
    let o = trialgate(&[
        "screen",
        "--bundle",
        "fixtures/bundles",
        "--as-of",
        "2026-06-01",
        "--format",
        "html",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let page = stdout(&o);
    assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
    for trial in [
        "NCT06406205",
        "belimumab-multitarget-ln",
        "felzartamab-refractory-ln",
        "NCT06535412",
        "biologic-induction-ln",
    ] {
        let section = page
            .split(&format!("<section id=\"trial-{trial}\">"))
            .nth(1)
            .expect("a section per trial");
        let section = section.split("</section>").next().unwrap_or_default();
        assert_eq!(section.matches("<tr class=").count(), 9, "{trial}: every patient once");
        // Candidates come before the ineligible.
        let first_inel = section.find("class=\"ineligible\"").unwrap_or(usize::MAX);
        let last_cand = section.rfind("class=\"potentially-eligible\"").unwrap_or(0);
        assert!(last_cand < first_inel, "{trial}: candidates first");
    }
    // Rosa Delgado is excluded from NCT06406205 by exc-1, and the page says why, with the
    // Observation that shows it.
    let rosa = page
        .split("<section id=\"trial-NCT06406205\">")
        .nth(1)
        .and_then(|s| s.split("<b>Rosa María Delgado</b><br><small>Patient/rosa-delgado</small>").nth(1))
        .and_then(|s| s.split("</tr>").next())
        .expect("Rosa's row, by name");
    assert!(rosa.contains("<td>TX-880153</td>"), "her MRN: {rosa}");
    assert!(rosa.contains("<b>exc-1</b> egfr 38"), "{rosa}");
    assert!(rosa.contains("[Observation/rosa-egfr-20260505]"), "{rosa}");
    assert!(
        !page.contains("newly eligible</mark>") && !page.contains("<a href"),
        "no history, no server"
    );
    // Reasons quote units such as mL/min/{1.73_m2}; nothing from the data is left unescaped.
    assert!(!page.contains("<b>exc-1</b> <"), "escaped");
    assert!(page.contains("data-filter=\"ineligible\" hidden"));
}
