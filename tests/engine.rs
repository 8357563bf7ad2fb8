//! Engine tests: FHIR fixtures built in code, screened through the library, verdicts checked
//! criterion by criterion. Screening date 2026-06-01 unless a test says otherwise. Most
//! tests are tables: one patient per row, all rows screened in one run.

mod common;

use common::*;
use serde_json::json;
use trialgate::criteria::{Outcome, Status};

use Outcome::{Manual, Met, NotMet, Unknown};

const D: &str = "2026-05-20";
const EGFR_UNIT: &str = "mL/min/{1.73_m2}";

fn egfr(v: f64, when: &str) -> serde_json::Value {
    obs("98979-8", v, EGFR_UNIT, when)
}

fn upcr(v: f64) -> serde_json::Value {
    obs("2890-2", v, "mg/mg", D)
}

// =============================================================== trial 000, threshold by threshold

#[test]
fn t000_age_boundaries() {
    let rows: Vec<(&str, Option<&str>, Outcome)> = vec![
        ("18th birthday on the screening date", Some("2008-06-01"), Met),
        ("17, one day short of 18", Some("2008-06-02"), NotMet),
        ("75 exactly", Some("1951-06-01"), Met),
        ("76", Some("1950-06-01"), NotMet),
        ("75, 76th birthday tomorrow", Some("1950-06-02"), Met),
        ("birthDate missing", None, Unknown),
        ("partial birthDate (year)", Some("2000"), Unknown),
        ("partial birthDate (year-month)", Some("2000-05"), Unknown),
        ("impossible birthDate", Some("2000-02-30"), Unknown),
    ];
    let pts: Vec<Pt> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, b, _))| {
            let p = Pt::bare(&format!("a{i}")).gender("male");
            match b {
                Some(b) => p.born(b),
                None => p,
            }
        })
        .collect();
    let res = screen(Trial::T000, &pts);
    for (i, (desc, _, want)) in rows.iter().enumerate() {
        expect(res.get(&format!("a{i}")), "inc-2", *want, desc);
    }
    reason_has(res.get("a0"), "inc-2", "age 18 at 2026-06-01 (required 18–75)", "age reason");
    reason_has(res.get("a5"), "inc-2", "birthDate not recorded", "missing birthDate");
    reason_has(res.get("a6"), "inc-2", "birthDate `2000` is not a full date", "partial birthDate");
    // A not-met inclusion decides the trial; an unknown one never does.
    assert_eq!(res.get("a1").status, Status::Ineligible);
    assert_eq!(
        res.get("a1").decided_by.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["inc-2"]
    );
    assert_eq!(res.get("a5").status, Status::PotentiallyEligible);
    let age = res.get("a0").facts.iter().find(|f| f.name == "age").expect("age fact");
    assert_eq!(age.value, json!(18));
}

#[test]
fn t000_exc1_egfr_threshold() {
    let rows: Vec<Row> = vec![
        ("eGFR 44.9 ≤ 45 excludes", vec![egfr(44.9, D)], Met),
        ("eGFR exactly 45 excludes", vec![egfr(45.0, D)], Met),
        ("eGFR 45.1 does not", vec![egfr(45.1, D)], NotMet),
        (
            "CKD-EPI 2009 code 62238-1 is a CKD-EPI eGFR",
            vec![obs("62238-1", 40.0, EGFR_UNIT, D)],
            Met,
        ),
        (
            "eGFR in mL/s/{1.73_m2}: 0.75 × 60 = 45",
            vec![obs("98979-8", 0.75, "mL/s/{1.73_m2}", D)],
            Met,
        ),
    ];
    let res = table(Trial::T000, "g", Pt::adult, "exc-1", &rows);
    let e = evidence(res.get("g1"), "exc-1", "Observation/g1-1");
    assert_eq!(e.value, Some(json!(45.0)));
    assert_eq!(e.unit.as_deref(), Some(EGFR_UNIT));
    assert_eq!(e.normalized_value, Some(45.0));
    assert_eq!(e.normalized_unit.as_deref(), Some(EGFR_UNIT));
    assert_eq!(e.code.as_deref(), Some("loinc|98979-8"));
    assert_eq!(e.date.as_deref(), Some(D));
    assert_eq!(res.get("g0").status, Status::Ineligible);
    assert!(res.get("g0").decided_by.iter().any(|d| d.id == "exc-1"));
    assert_eq!(res.get("g2").status, Status::PotentiallyEligible);
}

#[test]
fn t000_exc1_mdrd_egfr_is_not_ckd_epi() {
    let cr = |v: f64| obs("2160-0", v, "mg/dL", D);
    let rows: Vec<Row> = vec![
        (
            "MDRD eGFR 30 only: not usable, nothing to derive from",
            vec![obs("33914-3", 30.0, EGFR_UNIT, D)],
            Unknown,
        ),
        (
            "MDRD 30 + creatinine 1.0 (female 40): derived 73.0",
            vec![obs("33914-3", 30.0, EGFR_UNIT, D), cr(1.0)],
            NotMet,
        ),
        (
            "MDRD 60 + creatinine 3.0: derived eGFR is low",
            vec![obs("33914-3", 60.0, EGFR_UNIT, D), cr(3.0)],
            Met,
        ),
        (
            "MDRD 30 newer, CKD-EPI 60 older: the CKD-EPI value decides",
            vec![obs("33914-3", 30.0, EGFR_UNIT, D), egfr(60.0, "2026-05-01")],
            NotMet,
        ),
    ];
    let res = table(Trial::T000, "m", Pt::adult, "exc-1", &rows);
    reason_has(
        res.get("m0"),
        "exc-1",
        "1 value(s) by another equation (mdrd) not used",
        "MDRD note",
    );
    reason_has(res.get("m1"), "exc-1", "(derived)", "derived from creatinine");
    reason_has(res.get("m1"), "exc-1", "not used: the criterion names ckd-epi", "MDRD note kept");
    // The MDRD Observation is not evidence; the creatinine is.
    let c = crit(res.get("m1"), "exc-1");
    assert_eq!(
        c.evidence.iter().map(|e| e.resource.as_str()).collect::<Vec<_>>(),
        ["Observation/m1-2"]
    );
}

#[test]
fn t000_inc4b_upcr_by_biopsy_class() {
    let bx = |classes: &'static [&'static str]| biopsy("2026-03-01", classes);
    let rows: Vec<Row> = vec![
        ("class IV, UPCR 1.49", vec![bx(&["IV"]), upcr(1.49)], NotMet),
        ("class IV, UPCR 1.5 exactly", vec![bx(&["IV"]), upcr(1.5)], Met),
        ("class IV, UPCR 1.51", vec![bx(&["IV"]), upcr(1.51)], Met),
        ("class III, UPCR 1.5", vec![bx(&["III"]), upcr(1.5)], Met),
        ("class IV+V counts as IV, UPCR 1.5", vec![bx(&["IV", "V"]), upcr(1.5)], Met),
        ("class V only, UPCR 1.99", vec![bx(&["V"]), upcr(1.99)], NotMet),
        ("class V only, UPCR 2.0 exactly", vec![bx(&["V"]), upcr(2.0)], Met),
        (
            "class V only, UPCR 1.5 (III/IV threshold does not apply)",
            vec![bx(&["V"]), upcr(1.5)],
            NotMet,
        ),
        ("class II, UPCR 5", vec![bx(&["II"]), upcr(5.0)], NotMet),
        ("biopsy older than 2 years", vec![biopsy("2024-05-31", &["IV"]), upcr(3.0)], Unknown),
        ("biopsy exactly 2 years before", vec![biopsy("2024-06-01", &["IV"]), upcr(3.0)], Met),
        ("class IV, no UPCR", vec![bx(&["IV"])], Unknown),
        ("biopsy without coded class", vec![bx(&[]), upcr(3.0)], Unknown),
    ];
    let res = table(Trial::T000, "u", Pt::adult, "inc-4b", &rows);
    let e = evidence(res.get("u1"), "inc-4b", "Observation/u1-2");
    assert_eq!(e.normalized_value, Some(1.5));
    assert_eq!(e.normalized_unit.as_deref(), Some("mg/mg"));
    // inc-4a reads the same biopsy: met, but the listing asks for the Investigator's review.
    expect(res.get("u1"), "inc-4a", Manual, "class IV biopsy");
    reason_has(
        res.get("u1"),
        "inc-4a",
        "needs review: biopsy results must be reviewed",
        "inc-4a review",
    );
    expect(res.get("u8"), "inc-4a", NotMet, "class II biopsy");
    // inc-4c: a biopsy within 6 months settles it; an older one leaves the manual part.
    expect(res.get("u1"), "inc-4c", Met, "biopsy 3 months old");
    expect(res.get("u10"), "inc-4c", Manual, "biopsy 2 years old");
}

#[test]
fn t000_exc7b_liver_enzymes_times_uln() {
    let alt = |v: f64| obs("1742-6", v, "U/L", D);
    let ast = |v: f64| obs("1920-8", v, "U/L", D);
    let bili = |v: f64, u: &str| obs("1975-2", v, u, D);
    // Normal ALT, AST and bilirubin a few days older; each row adds one newer value.
    let base = |id: &str| {
        Pt::adult(id).add_all([
            obs("1742-6", 20.0, "U/L", "2026-05-10"),
            obs("1920-8", 20.0, "U/L", "2026-05-10"),
            obs("1975-2", 0.5, "mg/dL", "2026-05-10"),
        ])
    };
    let rows: Vec<Row> = vec![
        ("ALT 2.49× referenceRange high 40", vec![high(alt(99.6), 40.0, "U/L")], NotMet),
        ("ALT 2.5× referenceRange high 40", vec![high(alt(100.0), 40.0, "U/L")], Manual),
        ("ALT 2.49× default ULN 40", vec![alt(99.6)], NotMet),
        ("ALT 2.5× default ULN 40", vec![alt(100.0)], Manual),
        (
            "ALT 100 with referenceRange high 50 is 2×",
            vec![high(alt(100.0), 50.0, "U/L")],
            NotMet,
        ),
        ("AST 2.49× referenceRange high 40", vec![high(ast(99.6), 40.0, "U/L")], NotMet),
        ("AST 2.5× referenceRange high 40", vec![high(ast(100.0), 40.0, "U/L")], Manual),
        ("AST 2.49× default ULN", vec![ast(99.6)], NotMet),
        ("AST 2.5× default ULN", vec![ast(100.0)], Manual),
        ("bilirubin 2.49× default 1.2 mg/dL", vec![bili(2.988, "mg/dL")], NotMet),
        ("bilirubin 2.5× default 1.2 mg/dL", vec![bili(3.0, "mg/dL")], Manual),
        (
            "bilirubin 2.5× referenceRange 1.3 mg/dL",
            vec![high(bili(3.25, "mg/dL"), 1.3, "mg/dL")],
            Manual,
        ),
        (
            "bilirubin 2.49× referenceRange 1.3 mg/dL",
            vec![high(bili(3.237, "mg/dL"), 1.3, "mg/dL")],
            NotMet,
        ),
        ("bilirubin 2.5× in umol/L", vec![high(bili(52.5, "umol/L"), 21.0, "umol/L")], Manual),
        (
            "bilirubin mg/dL, range in umol/L",
            vec![high(bili(3.0, "mg/dL"), 20.52, "umol/L")],
            Manual,
        ),
        (
            "unitless range high is in the value's unit (2.5×)",
            vec![high(bili(3.0, "mg/dL"), 1.2, "")],
            Manual,
        ),
        (
            "unitless range high is in the value's unit (1.67×)",
            vec![high(bili(2.0, "mg/dL"), 1.2, "")],
            NotMet,
        ),
    ];
    let res = table(Trial::T000, "l", base, "exc-7b", &rows);
    reason_has(
        res.get("l1"),
        "exc-7b",
        "alt 100 U/L on 2026-05-20 = 2.5 × ULN (ULN 40 from the Observation's referenceRange) meets ≥ 2.5 × ULN",
        "computed part",
    );
    reason_has(
        res.get("l1"),
        "exc-7b",
        "needs review: abnormal at screening: the levels must be confirmed back below 2.5 × ULN",
        "review part",
    );
    reason_has(res.get("l3"), "exc-7b", "ULN 40 from the configured default", "default ULN");
    let e = evidence(res.get("l3"), "exc-7b", "Observation/l3-4");
    assert_eq!(e.note.as_deref(), Some("ULN 40 U/L from the configured default; ratio 2.5"));
    assert_eq!(e.value, Some(json!(100.0)));
    // Bilirubin's canonical unit is umol/L: 3.0 mg/dL is 51.3 umol/L, the default ULN 20.52.
    let e = evidence(res.get("l10"), "exc-7b", "Observation/l10-4");
    assert_eq!(e.unit.as_deref(), Some("mg/dL"));
    assert!((e.normalized_value.unwrap() - 51.3).abs() < 1e-9);
    // The review makes the criterion manual, which never decides the trial on its own.
    assert_eq!(res.get("l1").status, Status::PotentiallyEligible);

    // Without the other two enzymes, a low ALT cannot rule the exclusion out.
    let rows: Vec<Row> = vec![
        ("ALT 2.49× alone", vec![alt(99.6)], Unknown),
        ("ALT 2.5× alone", vec![alt(100.0)], Manual),
    ];
    table(Trial::T000, "l1x", Pt::adult, "exc-7b", &rows);
}

#[test]
fn t000_exc7d_blood_counts() {
    let base = |id: &str| {
        Pt::adult(id).add_all([
            obs("6690-2", 6.0, "10*9/L", "2026-05-10"),
            obs("751-8", 3.0, "10*9/L", "2026-05-10"),
            obs("777-3", 200.0, "10*9/L", "2026-05-10"),
        ])
    };
    let rows: Vec<Row> = vec![
        ("WBC 2.4", vec![obs("6690-2", 2.4, "10*9/L", D)], Manual),
        ("WBC 2.5", vec![obs("6690-2", 2.5, "10*9/L", D)], NotMet),
        ("ANC 1.3", vec![obs("751-8", 1.3, "10*9/L", D)], NotMet),
        ("ANC 1.29", vec![obs("751-8", 1.29, "10*9/L", D)], Manual),
        ("platelets 49", vec![obs("777-3", 49.0, "10*9/L", D)], Manual),
        ("platelets 50", vec![obs("777-3", 50.0, "10*9/L", D)], NotMet),
        ("WBC 2400 /uL", vec![obs("6690-2", 2400.0, "/uL", D)], Manual),
        ("WBC 2500 /uL", vec![obs("6690-2", 2500.0, "/uL", D)], NotMet),
        ("platelets 49 K/uL", vec![obs("777-3", 49.0, "K/uL", D)], Manual),
        ("platelets 49 x10E3/uL", vec![obs("777-3", 49.0, "x10E3/uL", D)], Manual),
        ("platelets 49000 /uL", vec![obs("777-3", 49000.0, "/uL", D)], Manual),
        ("platelets 50 10*3/uL", vec![obs("777-3", 50.0, "10*3/uL", D)], NotMet),
    ];
    let res = table(Trial::T000, "c", base, "exc-7d", &rows);
    reason_has(res.get("c0"), "exc-7d", "meets < 2.5 10*9/L", "computed part");
    reason_has(
        res.get("c0"),
        "exc-7d",
        "needs review: low counts exclude only when unrelated to active SLE",
        "review",
    );
    let e = evidence(res.get("c6"), "exc-7d", "Observation/c6-4");
    assert_eq!(e.normalized_value, Some(2.4));
    assert_eq!(e.value, Some(json!(2400.0)));
}

#[test]
fn t000_exc7a_ecg_and_blood_pressure() {
    let qtcf = |v: f64, u: &str| obs("76634-5", v, u, D);
    let qrs = |v: f64, u: &str| obs("8633-0", v, u, D);
    let base = |id: &str| Pt::adult(id).add(sle());
    let rows: Vec<Row> = vec![
        ("QTcF 481 with QRS 100", vec![qtcf(481.0, "ms"), qrs(100.0, "ms")], Met),
        ("QTcF 0.481 s with QRS 0.1 s", vec![qtcf(0.481, "s"), qrs(0.1, "s")], Met),
        // Undecided ECG parts stay undecided; the criterion is manual because "other severe
        // cardiovascular disease" always needs a person unless something decides it.
        ("QTcF 480 is not > 480", vec![qtcf(480.0, "ms"), qrs(100.0, "ms")], Manual),
        ("QRS 110 is not normal", vec![qtcf(481.0, "ms"), qrs(110.0, "ms")], Manual),
        ("QTcF without QRS", vec![qtcf(481.0, "ms")], Manual),
        ("BP 170/100", vec![bp_panel(170.0, 100.0, D)], Manual),
        ("BP 120/80", vec![bp_panel(120.0, 80.0, D)], Manual),
        ("heart failure", vec![condition(SNOMED, "84114007")], Met),
        (
            "atrial fibrillation, resolved (history counts)",
            vec![clinical(condition(ICD10CM, "I48.91"), "resolved")],
            Met,
        ),
    ];
    let res = table(Trial::T000, "q", base, "exc-7a", &rows);
    reason_has(res.get("q0"), "exc-7a", "qtcf 481 ms on 2026-05-20 meets > 480 ms", "QTcF");
    reason_has(res.get("q0"), "exc-7a", "qrs 100 ms on 2026-05-20 meets < 110 ms", "QRS");
    reason_has(res.get("q5"), "exc-7a", "needs review: blood pressure is high", "high BP");
    reason_has(
        res.get("q6"),
        "exc-7a",
        "whether other severe cardiovascular disease is present is a clinical judgment",
        "normal BP",
    );
    assert_eq!(res.get("q0").status, Status::Ineligible);
}

#[test]
fn t000_exc11_pregnancy() {
    // Negative serum and urine hCG, so only the Condition can decide.
    let base = |id: &str| {
        Pt::adult(id).add_all([
            sle(),
            obs_coded("2118-8", "260385009", "2026-05-25"),
            obs_coded("2106-3", "260385009", "2026-05-25"),
        ])
    };
    let preg = || condition(SNOMED, "77386006").with(json!({ "onsetDateTime": "2026-03-01" }));
    let rows: Vec<Row> = vec![
        ("active pregnancy", vec![preg()], Met),
        (
            "resolved pregnancy with abatement",
            vec![clinical(preg(), "resolved").with(json!({ "abatementDateTime": "2025-12-01" }))],
            NotMet,
        ),
        (
            "clinicalStatus active but abated in the past",
            vec![preg().with(json!({ "abatementDateTime": "2025-12-01" }))],
            NotMet,
        ),
        (
            "clinicalStatus active, abatement after the screening day",
            vec![preg().with(json!({ "abatementDateTime": "2026-06-02" }))],
            Met,
        ),
        ("refuted pregnancy", vec![verification(preg(), "refuted")], NotMet),
        ("ICD-10-CM Z33.1", vec![condition(ICD10CM, "Z33.1")], Met),
        ("breastfeeding Z39.1", vec![condition(ICD10CM, "Z39.1")], Met),
        (
            "positive serum hCG, newer than the negative",
            vec![obs_coded("2118-8", "10828004", "2026-05-28")],
            Met,
        ),
        (
            "positive serum hCG as text",
            vec![obs_text("2118-8", "Positive", "2026-05-28")],
            Met,
        ),
        ("no pregnancy", vec![], NotMet),
    ];
    let res = table(Trial::T000, "p", base, "exc-11", &rows);
    assert_eq!(res.get("p0").status, Status::Ineligible);
    assert_eq!(
        evidence(res.get("p0"), "exc-11", "Condition/p0-4").code.as_deref(),
        Some("snomed|77386006")
    );
    // inc-7 for a woman: the hCG part is not positive, the rest is asked at screening.
    expect(res.get("p9"), "inc-7", Manual, "negative hCG");
    expect(res.get("p7"), "inc-7", NotMet, "positive hCG");
}

#[test]
fn t000_exc9_live_vaccine_within_4_weeks() {
    let rows: Vec<Row> = vec![
        ("MMR (CVX 03) 27 days before", vec![immunization("03", &days_before(27))], Met),
        ("MMR 28 days before (window edge)", vec![immunization("03", &days_before(28))], Met),
        ("MMR 29 days before", vec![immunization("03", &days_before(29))], NotMet),
        ("varicella (CVX 21) yesterday", vec![immunization("21", &days_before(1))], Met),
        (
            "influenza, inactivated (CVX 141)",
            vec![immunization("141", &days_before(3))],
            NotMet,
        ),
        (
            "MMR not done",
            vec![immunization("03", &days_before(3)).with(json!({ "status": "not-done" }))],
            NotMet,
        ),
        (
            "MMR entered in error",
            vec![immunization("03", &days_before(3)).with(json!({ "status": "entered-in-error" }))],
            NotMet,
        ),
        ("MMR with a partial date", vec![immunization("03", "2026-05")], Unknown),
        ("no Immunization records at all", vec![sle()], Unknown),
    ];
    let res = table(Trial::T000, "v", Pt::adult, "exc-9", &rows);
    let e = evidence(res.get("v0"), "exc-9", "Immunization/v0-1");
    assert_eq!(e.date.as_deref(), Some("2026-05-05"));
    assert_eq!(e.code.as_deref(), Some("cvx|03"));
    reason_has(res.get("v8"), "exc-9", "no Immunization records at all", "no records");
}

#[test]
fn t000_exc7f_iv_anti_infective() {
    let iv = "47625008";
    let rows: Vec<Row> = vec![
        (
            "IV ceftriaxone 10 days ago",
            vec![med_admin(RXNORM, "2193", &days_before(10), iv)],
            Met,
        ),
        (
            "IV ceftriaxone 30 days ago",
            vec![med_admin(RXNORM, "2193", &days_before(30), iv)],
            Met,
        ),
        (
            "IV ceftriaxone 31 days ago",
            vec![med_admin(RXNORM, "2193", &days_before(31), iv)],
            NotMet,
        ),
        (
            "oral antibiotic",
            vec![med_admin(RXNORM, "2193", &days_before(10), "26643006")],
            NotMet,
        ),
        (
            "ceftriaxone injection product, route from the product",
            vec![med_admin(RXNORM, "1665021", &days_before(10), "")],
            Met,
        ),
        (
            "ATC J01DD04, route as text only",
            vec![med_admin(ATC, "J01DD04", &days_before(10), "").with(json!({ "dosage": { "route": { "text": "Intravenous" } } }))],
            Met,
        ),
        (
            "ingredient without any route",
            vec![med_admin(RXNORM, "2193", &days_before(10), "")],
            Unknown,
        ),
        (
            "administration not done",
            vec![med_admin(RXNORM, "2193", &days_before(10), iv).with(json!({ "status": "not-done" }))],
            NotMet,
        ),
        (
            "IV mycophenolate is not an anti-infective",
            vec![med_admin(RXNORM, "1719276", &days_before(10), iv)],
            NotMet,
        ),
        ("no medication records at all", vec![sle()], Unknown),
    ];
    let res = table(Trial::T000, "f", Pt::adult, "exc-7f", &rows);
    assert_eq!(res.get("f0").status, Status::Ineligible);
    reason_has(
        res.get("f0"),
        "exc-7f",
        "anti-infectives (route-intravenous) within 30 days of 2026-06-01",
        "reason",
    );
    let e = evidence(res.get("f0"), "exc-7f", "MedicationAdministration/f0-1");
    assert_eq!(e.normalized_value, Some(1.0));
    assert_eq!(e.normalized_unit.as_deref(), Some("g"));
}

// =============================================================== units and code systems

const UNITS_TRIAL: &[(&str, &str, &str)] = &[
    ("upcr", "inclusion", "{lab: upcr, op: \">=\", value: 1.5, unit: mg/mg}"),
    ("creat", "exclusion", "{lab: creatinine, op: \">=\", value: 1.5, unit: mg/dL}"),
    (
        "glucose",
        "exclusion",
        "{lab: glucose-fasting, op: \">=\", value: 7.0, unit: mmol/L}",
    ),
    ("wbc", "exclusion", "{lab: wbc, op: \"<\", value: 2.5, unit: \"10*9/L\"}"),
    ("plt", "exclusion", "{lab: platelets, op: \"<\", value: 50, unit: \"10*9/L\"}"),
    (
        "egfr",
        "exclusion",
        "{lab: egfr, op: \"<=\", value: 45, unit: \"mL/min/{1.73_m2}\", derive: false}",
    ),
    (
        "prot24",
        "inclusion",
        "{lab: urine-protein-24h, op: \">=\", value: 1.0, unit: \"g/(24.h)\"}",
    ),
];

/// (description, criterion, Observation, outcome, normalized value when decided).
type UnitRow = (&'static str, &'static str, serde_json::Value, Outcome, Option<f64>);

#[test]
fn units_normalize_to_the_canonical_unit() {
    let rows: Vec<UnitRow> = vec![
        ("UPCR 1.5 mg/mg", "upcr", obs("2890-2", 1.5, "mg/mg", D), Met, Some(1.5)),
        ("UPCR 1.5 g/g", "upcr", obs("2890-2", 1.5, "g/g", D), Met, Some(1.5)),
        ("UPCR 1500 mg/g = 1.5", "upcr", obs("2890-2", 1500.0, "mg/g", D), Met, Some(1.5)),
        ("UPCR 1490 mg/g", "upcr", obs("2890-2", 1490.0, "mg/g", D), NotMet, Some(1.49)),
        (
            "UPCR 169.7 mg/mmol ≈ 1.5002",
            "upcr",
            obs("2890-2", 169.7, "mg/mmol", D),
            Met,
            Some(169.7 / 113.12),
        ),
        (
            "UPCR 169.6 mg/mmol ≈ 1.4993",
            "upcr",
            obs("2890-2", 169.6, "mg/mmol", D),
            NotMet,
            Some(169.6 / 113.12),
        ),
        (
            "UPCR 1.5 `mg/mg creat`",
            "upcr",
            obs("2890-2", 1.5, "mg/mg creat", D),
            Met,
            Some(1.5),
        ),
        (
            "UPCR in mg/dL cannot be converted",
            "upcr",
            obs("2890-2", 150.0, "mg/dL", D),
            Unknown,
            None,
        ),
        ("creatinine 1.5 mg/dL", "creat", obs("2160-0", 1.5, "mg/dL", D), Met, Some(1.5)),
        (
            "creatinine 1.49 mg/dL",
            "creat",
            obs("2160-0", 1.49, "mg/dL", D),
            NotMet,
            Some(1.49),
        ),
        (
            "creatinine 133 umol/L",
            "creat",
            obs("2160-0", 133.0, "umol/L", D),
            Met,
            Some(133.0 / 88.4),
        ),
        (
            "creatinine 132 µmol/L",
            "creat",
            obs("2160-0", 132.0, "µmol/L", D),
            NotMet,
            Some(132.0 / 88.4),
        ),
        ("glucose 7.0 mmol/L", "glucose", obs("1558-6", 7.0, "mmol/L", D), Met, Some(7.0)),
        (
            "glucose 126 mg/dL ≈ 6.994",
            "glucose",
            obs("1558-6", 126.0, "mg/dL", D),
            NotMet,
            Some(126.0 / 18.016),
        ),
        (
            "glucose 126.2 mg/dL ≈ 7.005",
            "glucose",
            obs("1558-6", 126.2, "mg/dL", D),
            Met,
            Some(126.2 / 18.016),
        ),
        ("WBC 2400 /uL", "wbc", obs("6690-2", 2400.0, "/uL", D), Met, Some(2.4)),
        ("WBC 2500 /uL", "wbc", obs("6690-2", 2500.0, "/uL", D), NotMet, Some(2.5)),
        ("WBC 2.4 10*3/uL", "wbc", obs("6690-2", 2.4, "10*3/uL", D), Met, Some(2.4)),
        ("WBC 2.4 10*9/L", "wbc", obs("6690-2", 2.4, "10*9/L", D), Met, Some(2.4)),
        ("WBC 2.4 K/uL", "wbc", obs("6690-2", 2.4, "K/uL", D), Met, Some(2.4)),
        ("WBC 2.4 x10E3/uL", "wbc", obs("6690-2", 2.4, "x10E3/uL", D), Met, Some(2.4)),
        ("WBC 2.5 K/uL", "wbc", obs("6690-2", 2.5, "K/uL", D), NotMet, Some(2.5)),
        ("WBC 2.4 with no unit", "wbc", obs("6690-2", 2.4, "", D), Unknown, None),
        ("platelets 49000 /uL", "plt", obs("777-3", 49000.0, "/uL", D), Met, Some(49.0)),
        ("platelets 50 10*3/uL", "plt", obs("777-3", 50.0, "10*3/uL", D), NotMet, Some(50.0)),
        ("eGFR 45 mL/min/{1.73_m2}", "egfr", egfr(45.0, D), Met, Some(45.0)),
        (
            "eGFR 44 mL/min/1.73m2",
            "egfr",
            obs("98979-8", 44.0, "mL/min/1.73m2", D),
            Met,
            Some(44.0),
        ),
        (
            "eGFR 46 mL/min/1.73 m²",
            "egfr",
            obs("98979-8", 46.0, "mL/min/1.73 m²", D),
            NotMet,
            Some(46.0),
        ),
        ("eGFR 30 in plain mL/min", "egfr", obs("98979-8", 30.0, "mL/min", D), Unknown, None),
        (
            "24-h protein 1.0 g/(24.h)",
            "prot24",
            obs("2889-4", 1.0, "g/(24.h)", D),
            Met,
            Some(1.0),
        ),
        (
            "24-h protein 1000 mg/(24.h)",
            "prot24",
            obs("2889-4", 1000.0, "mg/(24.h)", D),
            Met,
            Some(1.0),
        ),
        (
            "24-h protein 999 mg/(24.h)",
            "prot24",
            obs("2889-4", 999.0, "mg/(24.h)", D),
            NotMet,
            Some(0.999),
        ),
        ("24-h protein 1.0 g/d", "prot24", obs("2889-4", 1.0, "g/d", D), Met, Some(1.0)),
        ("24-h protein 0.9 g/d", "prot24", obs("2889-4", 0.9, "g/d", D), NotMet, Some(0.9)),
    ];
    let trial = trial_yaml(UNITS_TRIAL);
    let pts: Vec<Pt> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, _, o, _, _))| Pt::adult(&format!("n{i}")).add(o.clone()))
        .collect();
    let res = screen(Trial::Yaml(&trial), &pts);
    for (i, (desc, id, _, want, norm)) in rows.iter().enumerate() {
        let pid = format!("n{i}");
        let r = res.get(&pid);
        expect(r, id, *want, desc);
        let e = evidence(r, id, &format!("Observation/{pid}-1"));
        // Exact: the conversion is done once, as written (IEEE division or multiplication).
        assert_eq!(e.normalized_value, *norm, "{desc}: normalized value");
    }
    let plain = res.get(&format!("n{}", rows.iter().position(|r| r.0 == "eGFR 30 in plain mL/min").unwrap()));
    reason_has(
        plain,
        "egfr",
        "is in unit `mL/min`, which cannot be converted to mL/min/{1.73_m2}",
        "unit named",
    );
    let upcr_mg_dl = res.get(&format!("n{}", rows.iter().position(|r| r.0.starts_with("UPCR in mg/dL")).unwrap()));
    reason_has(upcr_mg_dl, "upcr", "`mg/dL`", "unit named");
}

#[test]
fn upcr_mg_mmol_is_divided_by_113_12_exactly() {
    let res = table(
        Trial::T000,
        "mm",
        Pt::adult,
        "inc-4b",
        &[(
            "class IV, UPCR 169.7 mg/mmol",
            vec![biopsy("2026-03-01", &["IV"]), obs("2890-2", 169.7, "mg/mmol", D)],
            Met,
        )],
    );
    let e = evidence(res.get("mm0"), "inc-4b", "Observation/mm0-2");
    assert_eq!(e.value, Some(json!(169.7)));
    assert_eq!(e.unit.as_deref(), Some("mg/mmol"));
    assert_eq!(e.normalized_value, Some(169.7 / 113.12));
    assert_eq!(e.normalized_unit.as_deref(), Some("mg/mg"));
}

const CODES_TRIAL: &[(&str, &str, &str)] = &[
    ("sle", "inclusion", "{condition: sle, status: any}"),
    ("malignancy", "exclusion", "{condition: malignancy, status: any}"),
    (
        "egfr",
        "exclusion",
        "{lab: egfr, op: \"<=\", value: 45, unit: \"mL/min/{1.73_m2}\"}",
    ),
    ("mmf", "inclusion", "{medication: mycophenolate}"),
    ("mmf-allergy", "exclusion", "{allergy: mycophenolate}"),
];

#[test]
fn code_system_variants() {
    let trial = trial_yaml(CODES_TRIAL);
    let t = Trial::Yaml(&trial);
    let rows: Vec<Row> = vec![
        ("SNOMED 55464009", vec![condition(SNOMED, "55464009")], Met),
        ("SNOMED by OID", vec![condition("urn:oid:2.16.840.1.113883.6.96", "55464009")], Met),
        ("WHO ICD-10 M32.1", vec![condition(ICD10_WHO, "M32.1")], Met),
        ("ICD-10-CM M3214 without the dot", vec![condition(ICD10CM, "M3214")], Met),
        ("ICD-10-CM m32.14 in lower case", vec![condition(ICD10CM, "m32.14")], Met),
        (
            "ICD-10-CM by OID, M32.9",
            vec![condition("urn:oid:2.16.840.1.113883.6.90", "M32.9")],
            Met,
        ),
        ("drug-induced lupus M32.0 is not SLE", vec![condition(ICD10CM, "M32.0")], NotMet),
        ("discoid lupus L93.0 is not SLE", vec![condition(ICD10CM, "L93.0")], NotMet),
        (
            "lupus erythematosus 200936003 is not SLE",
            vec![condition(SNOMED, "200936003")],
            NotMet,
        ),
        (
            "M32.1 in an unknown local system",
            vec![condition("http://example.org/local", "M32.1")],
            NotMet,
        ),
    ];
    table(t, "s", Pt::adult, "sle", &rows);

    let rows: Vec<Row> = vec![
        ("C50.911 is a malignancy", vec![condition(ICD10CM, "C50.911")], Met),
        ("C50911 without the dot", vec![condition(ICD10CM, "C50911")], Met),
        ("C96.Z, end of the range", vec![condition(ICD10CM, "C96.Z")], Met),
        ("C00.0, start of the range", vec![condition(ICD10_WHO, "C00.0")], Met),
        ("D03.9 (melanoma in situ) is not", vec![condition(ICD10CM, "D03.9")], NotMet),
        ("C97 is outside C00-C96", vec![condition(ICD10CM, "C97")], NotMet),
    ];
    table(t, "k", Pt::adult, "malignancy", &rows);

    let rows: Vec<Row> = vec![
        (
            "LOINC by OID",
            vec![obs_in("urn:oid:2.16.840.1.113883.6.1", "98979-8", 30.0, EGFR_UNIT, D)],
            Met,
        ),
        (
            "LOINC code in a local system",
            vec![obs_in("http://example.org/lab", "98979-8", 30.0, EGFR_UNIT, D)],
            Unknown,
        ),
        (
            "second coding is LOINC",
            vec![obs("98979-8", 30.0, EGFR_UNIT, D).with(json!({ "code": { "coding": [
                    { "system": "http://example.org/lab", "code": "EGFR" },
                    { "system": LOINC, "code": "98979-8" },
                ] } }))],
            Met,
        ),
    ];
    table(t, "o", Pt::adult, "egfr", &rows);

    let mmf_ref = json!({ "resourceType": "Medication", "id": "mmf-tab", "code": coding(RXNORM, "200060") });
    let rows: Vec<Row> = vec![
        (
            "SCD 200060 rolls up to mycophenolate",
            vec![med_request("200060", "2026-01-10")],
            Met,
        ),
        ("ingredient 68149", vec![med_request("68149", "2026-01-10")], Met),
        (
            "RxNorm by OID",
            vec![med_request("200060", "2026-01-10").with(json!({
            "medicationCodeableConcept": coding("urn:oid:2.16.840.1.113883.6.88", "200060") }))],
            Met,
        ),
        (
            "mycophenolic acid DR tablet 311627",
            vec![med_statement("311627", "2026-02-01")],
            Met,
        ),
        (
            "medicationReference to a Medication with 200060",
            vec![
                mmf_ref.clone(),
                med_request("200060", "2026-01-10").with(json!({
                    "medicationCodeableConcept": null, "medicationReference": { "reference": "Medication/mmf-tab" } })),
            ],
            Met,
        ),
        (
            "contained Medication with 200060",
            vec![med_request("200060", "2026-01-10").with(json!({
                "medicationCodeableConcept": null,
                "contained": [{ "resourceType": "Medication", "id": "m1", "code": coding(RXNORM, "200060") }],
                "medicationReference": { "reference": "#m1" } }))],
            Met,
        ),
        (
            "tacrolimus capsule is not mycophenolate",
            vec![med_request("197589", "2026-01-10")],
            NotMet,
        ),
    ];
    let res = table(t, "r", Pt::adult, "mmf", &rows);
    assert_eq!(
        evidence(res.get("r0"), "mmf", "MedicationRequest/r0-1").code.as_deref(),
        Some("rxnorm|200060")
    );

    let rows: Vec<Row> = vec![
        ("allergy to SCD 200060", vec![allergy(RXNORM, "200060")], Met),
        ("allergy to ingredient 68149", vec![allergy(RXNORM, "68149")], Met),
        ("allergy to tacrolimus", vec![allergy(RXNORM, "42316")], NotMet),
        ("no AllergyIntolerance records", vec![sle()], Unknown),
    ];
    table(t, "y", Pt::adult, "mmf-allergy", &rows);
}

// =============================================================== time

#[test]
fn windows_just_inside_and_just_outside() {
    let rows: Vec<Row> = vec![
        ("date 2026-03-03 is day 90", vec![egfr(30.0, "2026-03-03")], Met),
        (
            "2026-03-02T23:59:59Z is before the window",
            vec![egfr(30.0, "2026-03-02T23:59:59Z")],
            Unknown,
        ),
        ("2026-03-02 (date) is day 91", vec![egfr(30.0, "2026-03-02")], Unknown),
        (
            "2026-03-02T23:30:00-01:00 is 2026-03-03T00:30Z",
            vec![egfr(30.0, "2026-03-02T23:30:00-01:00")],
            Met,
        ),
        (
            "2026-06-01T23:59:59Z is the last second",
            vec![egfr(30.0, "2026-06-01T23:59:59Z")],
            Met,
        ),
        (
            "2026-06-01T23:30:00-02:00 is after the day",
            vec![egfr(30.0, "2026-06-01T23:30:00-02:00")],
            Unknown,
        ),
        (
            "2026-06-02T01:00:00+02:00 is still the screening day",
            vec![egfr(30.0, "2026-06-02T01:00:00+02:00")],
            Met,
        ),
        (
            "fractional seconds and +05:30",
            vec![egfr(30.0, "2026-05-10T08:00:00.123+05:30")],
            Met,
        ),
        ("partial date 2026-05 is unusable", vec![egfr(30.0, "2026-05")], Unknown),
        (
            "effectivePeriod.start when no effectiveDateTime",
            vec![egfr(30.0, D).with(json!({ "effectiveDateTime": null, "effectivePeriod": { "start": D } }))],
            Met,
        ),
        (
            "unusable effectiveDateTime is not replaced by the period",
            vec![egfr(30.0, "2026-05").with(json!({ "effectivePeriod": { "start": D } }))],
            Unknown,
        ),
    ];
    let res = table(Trial::T000, "w", Pt::adult, "exc-1", &rows);
    reason_has(
        res.get("w1"),
        "exc-1",
        "no valid egfr from 2026-03-03 to 2026-06-01",
        "window shown",
    );
    assert_eq!(
        evidence(res.get("w3"), "exc-1", "Observation/w3-1").date.as_deref(),
        Some("2026-03-03T00:30:00Z")
    );
}

#[test]
fn latest_wins_by_instant_then_greatest_id() {
    let rows: Vec<Row> = vec![
        (
            "newer 60 after older 30",
            vec![egfr(30.0, "2026-05-01"), egfr(60.0, "2026-05-02")],
            NotMet,
        ),
        (
            "newer 30 after older 60",
            vec![egfr(60.0, "2026-05-01"), egfr(30.0, "2026-05-02")],
            Met,
        ),
        (
            "instants, not local dates: 2026-05-02T01:00+05:00 is before 2026-05-01T21:00Z",
            vec![egfr(30.0, "2026-05-02T01:00:00+05:00"), egfr(60.0, "2026-05-01T21:00:00Z")],
            NotMet,
        ),
        (
            "same instant: greatest id wins (b=60)",
            vec![
                egfr(30.0, "2026-05-01T10:00:00Z").id("egfr-a"),
                egfr(60.0, "2026-05-01T12:00:00+02:00").id("egfr-b"),
            ],
            NotMet,
        ),
        (
            "same instant: greatest id wins (b=30)",
            vec![
                egfr(60.0, "2026-05-01T12:00:00+02:00").id("egfr-a"),
                egfr(30.0, "2026-05-01T10:00:00Z").id("egfr-b"),
            ],
            Met,
        ),
        (
            "ids compare as strings: egfr-9 > egfr-10",
            vec![egfr(30.0, D).id("egfr-9"), egfr(60.0, D).id("egfr-10")],
            Met,
        ),
    ];
    let res = table(Trial::T000, "lw", Pt::adult, "exc-1", &rows);
    let c = crit(res.get("lw3"), "exc-1");
    assert_eq!(c.evidence.len(), 1);
    assert_eq!(c.evidence[0].resource, "Observation/egfr-b");
}

// =============================================================== records that do not count

#[test]
fn ignored_observations() {
    // An older final eGFR of 60 (not met) decides unless the newer 30 counts.
    let base = |id: &str| Pt::adult(id).add(egfr(60.0, "2026-04-01"));
    let newer = || egfr(30.0, D);
    let st = |s: &str| newer().with(json!({ "status": s }));
    let rows: Vec<Row> = vec![
        ("final counts", vec![newer()], Met),
        ("amended counts", vec![st("amended")], Met),
        ("corrected counts", vec![st("corrected")], Met),
        ("entered-in-error ignored", vec![st("entered-in-error")], NotMet),
        ("cancelled ignored", vec![st("cancelled")], NotMet),
        ("preliminary ignored", vec![st("preliminary")], NotMet),
        ("registered ignored", vec![st("registered")], NotMet),
        ("no status ignored", vec![newer().with(json!({ "status": null }))], NotMet),
        ("value-less (dataAbsentReason) ignored", vec![obs_absent("98979-8", D)], NotMet),
        (
            "valueQuantity without a value ignored",
            vec![newer().with(json!({ "valueQuantity": { "unit": EGFR_UNIT } }))],
            NotMet,
        ),
        ("no time ignored", vec![newer().with(json!({ "effectiveDateTime": null }))], NotMet),
        (
            "unconvertible unit makes it unknown, naming the unit",
            vec![obs("98979-8", 30.0, "mL/min", D)],
            Unknown,
        ),
    ];
    let res = table(Trial::T000, "io", base, "exc-1", &rows);
    let e = &crit(res.get("io5"), "exc-1").evidence;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].resource, "Observation/io5-1", "the older final value decides");
    assert_eq!(e[0].value, Some(json!(60.0)));
    reason_has(res.get("io11"), "exc-1", "`mL/min`", "unit named");
}

#[test]
fn ignored_conditions() {
    let trial = trial_yaml(&[("sle", "inclusion", "{condition: sle}")]);
    let abated = |when: &str| sle().with(json!({ "abatementDateTime": when }));
    let rows: Vec<Row> = vec![
        ("active, confirmed", vec![sle()], Met),
        ("provisional counts", vec![verification(sle(), "provisional")], Met),
        ("unconfirmed counts", vec![verification(sle(), "unconfirmed")], Met),
        ("refuted ignored", vec![verification(sle(), "refuted")], NotMet),
        ("entered-in-error ignored", vec![verification(sle(), "entered-in-error")], NotMet),
        ("clinicalStatus resolved", vec![clinical(sle(), "resolved")], NotMet),
        ("clinicalStatus inactive", vec![clinical(sle(), "inactive")], NotMet),
        ("clinicalStatus remission", vec![clinical(sle(), "remission")], NotMet),
        ("clinicalStatus relapse", vec![clinical(sle(), "relapse")], Met),
        ("clinicalStatus recurrence", vec![clinical(sle(), "recurrence")], Met),
        ("active but abated last year", vec![abated("2025-06-01")], NotMet),
        (
            "active but abated during the screening day",
            vec![abated("2026-06-01T12:00:00Z")],
            NotMet,
        ),
        ("active, abatement after the screening day", vec![abated("2026-06-02")], Met),
        (
            "active, abatement in the evening in UTC-05:00 is the next day",
            vec![abated("2026-06-01T20:00:00-05:00")],
            Met,
        ),
        (
            "onset after the screening date: not yet",
            vec![sle().with(json!({ "onsetDateTime": "2026-06-10" }))],
            NotMet,
        ),
        ("no Condition records at all", vec![], Unknown),
        ("only an unrelated Condition", vec![condition(SNOMED, "195967001")], NotMet),
    ];
    let res = table(Trial::Yaml(&trial), "ic", Pt::adult, "sle", &rows);
    reason_has(res.get("ic15"), "sle", "the record holds no Condition records at all", "no records");
    reason_has(res.get("ic16"), "sle", "no sle condition recorded", "none matching");
    let e = evidence(res.get("ic0"), "sle", "Condition/ic0-1");
    assert_eq!(e.code.as_deref(), Some("snomed|55464009"));
    assert_eq!(e.date.as_deref(), Some("2020-01-01"));
    assert_eq!(e.note.as_deref(), Some("clinicalStatus active"));
}

#[test]
fn ignored_medications() {
    let trial = trial_yaml(&[("mmf", "exclusion", "{medication: mycophenolate, within: 90d}")]);
    let req = || med_request("200060", "2026-05-01");
    let rows: Vec<Row> = vec![
        ("request, order", vec![req()], Met),
        ("request, intent plan", vec![req().with(json!({ "intent": "plan" }))], NotMet),
        (
            "request, intent proposal",
            vec![req().with(json!({ "intent": "proposal" }))],
            NotMet,
        ),
        ("request, doNotPerform", vec![req().with(json!({ "doNotPerform": true }))], NotMet),
        ("request, cancelled", vec![req().with(json!({ "status": "cancelled" }))], NotMet),
        ("request, draft", vec![req().with(json!({ "status": "draft" }))], NotMet),
        (
            "request, entered-in-error",
            vec![req().with(json!({ "status": "entered-in-error" }))],
            NotMet,
        ),
        (
            "request, completed long ago",
            vec![med_request("200060", "2025-01-01").with(json!({ "status": "completed" }))],
            NotMet,
        ),
        ("statement, active", vec![med_statement("200060", "2026-05-01")], Met),
        (
            "statement, not-taken",
            vec![med_statement("200060", "2026-05-01").with(json!({ "status": "not-taken" }))],
            NotMet,
        ),
        (
            "statement, entered-in-error",
            vec![med_statement("200060", "2026-05-01").with(json!({ "status": "entered-in-error" }))],
            NotMet,
        ),
        (
            "administration, completed",
            vec![med_admin(RXNORM, "200060", "2026-05-01", "")],
            Met,
        ),
        (
            "administration, not-done",
            vec![med_admin(RXNORM, "200060", "2026-05-01", "").with(json!({ "status": "not-done" }))],
            NotMet,
        ),
        ("no medication records at all", vec![], Unknown),
    ];
    table(Trial::Yaml(&trial), "im", Pt::adult, "mmf", &rows);

    // A finished order with only authoredOn lasts its expected supply, fill after fill:
    // authored 2026-01-01, 30 days x 3 fills reaches 2026-04-01, inside the 90-day window
    // (from 2026-03-03); a single fill ends on 2026-01-31, before it.
    let supply = |repeats: u32| {
        med_request("200060", "2026-01-01").with(json!({ "status": "completed", "dispenseRequest": {
            "numberOfRepeatsAllowed": repeats,
            "expectedSupplyDuration": { "value": 30, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d" } } }))
    };
    let rows: Vec<Row> = vec![
        ("completed, 30 days x 3 fills", vec![supply(2)], Met),
        ("completed, one 30-day fill", vec![supply(0)], NotMet),
        (
            "active order whose dispensing window lapsed is still taken",
            vec![
                med_request("200060", "2025-01-01")
                    .with(json!({ "dispenseRequest": { "validityPeriod": { "start": "2025-01-01", "end": "2025-06-01" } } })),
            ],
            Met,
        ),
    ];
    table(Trial::Yaml(&trial), "sup", Pt::adult, "mmf", &rows);
}

#[test]
fn ignored_procedures_immunizations_allergies() {
    let trial = trial_yaml(&[
        ("dialysis", "exclusion", "{procedure: dialysis, within: 30d}"),
        ("mmf-allergy", "exclusion", "{allergy: mycophenolate}"),
    ]);
    let t = Trial::Yaml(&trial);
    let hd = || procedure(CPT, "90935", &days_before(10));
    let st = |s: &str| hd().with(json!({ "status": s }));
    let rows: Vec<Row> = vec![
        ("completed", vec![hd()], Met),
        ("in-progress", vec![st("in-progress")], Met),
        ("not-done ignored", vec![st("not-done")], NotMet),
        ("entered-in-error ignored", vec![st("entered-in-error")], NotMet),
        ("preparation ignored", vec![st("preparation")], NotMet),
        ("completed 40 days ago", vec![procedure(CPT, "90935", &days_before(40))], NotMet),
        (
            "CPT 90960 in the 90951-90970 range",
            vec![procedure(CPT, "90960", &days_before(5))],
            Met,
        ),
        (
            "SNOMED haemodialysis by period",
            vec![procedure(SNOMED, "302497006", "2026-01-01").with(json!({
            "performedDateTime": null, "performedPeriod": { "start": "2026-01-01", "end": days_before(2) } }))],
            Met,
        ),
    ];
    table(t, "ip", Pt::adult, "dialysis", &rows);

    let al = || allergy(RXNORM, "200060");
    let rows: Vec<Row> = vec![
        ("active, confirmed", vec![al()], Met),
        (
            "no statuses at all",
            vec![al().with(json!({ "clinicalStatus": null, "verificationStatus": null }))],
            Met,
        ),
        (
            "refuted",
            vec![al().with(json!({ "verificationStatus": coding(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "refuted") }))],
            NotMet,
        ),
        (
            "entered-in-error",
            vec![al().with(json!({ "verificationStatus": coding(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "entered-in-error") }))],
            NotMet,
        ),
        (
            "resolved",
            vec![al().with(json!({ "clinicalStatus": coding(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "resolved") }))],
            NotMet,
        ),
        (
            "inactive",
            vec![al().with(json!({ "clinicalStatus": coding(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "inactive") }))],
            NotMet,
        ),
    ];
    table(t, "ia", Pt::adult, "mmf-allergy", &rows);
}

// =============================================================== missing data, comparators

#[test]
fn missing_data_is_never_ineligible() {
    let pts = vec![
        Pt::adult("empty"),
        Pt::adult("labs-only").add_all([egfr(60.0, D), obs("2890-2", 2.0, "mg/mg", D)]),
    ];
    let res = screen(Trial::T000, &pts);
    let r = res.get("empty");
    assert_eq!(r.status, Status::PotentiallyEligible);
    assert!(r.decided_by.is_empty());
    expect(r, "inc-2", Met, "age 40");
    for id in [
        "inc-3", "inc-4a", "inc-4b", "exc-1", "exc-6a", "exc-6b", "exc-7b", "exc-7d", "exc-7f", "exc-9", "exc-11",
    ] {
        expect(r, id, Unknown, "no data");
    }
    for c in &r.criteria {
        assert!(
            matches!(c.outcome, Unknown | Manual) || c.id == "inc-2",
            "{} is {} with no data: {}",
            c.id,
            c.outcome.as_str(),
            c.reason
        );
    }
    reason_has(r, "exc-1", "no valid egfr from 2026-03-03 to 2026-06-01", "lab");
    reason_has(r, "inc-3", "the record holds no Condition records at all", "condition");

    let r = res.get("labs-only");
    assert_eq!(r.status, Status::PotentiallyEligible);
    expect(r, "exc-1", NotMet, "eGFR 60");
    expect(r, "inc-3", Unknown, "no Conditions");
    expect(r, "exc-6b", Unknown, "no Conditions");
    expect(r, "inc-4b", Unknown, "UPCR but no biopsy");
}

#[test]
fn comparators_make_bounds() {
    let rows: Vec<Row> = vec![
        ("eGFR >90", vec![cmp(egfr(90.0, D), ">")], NotMet),
        ("eGFR >=46", vec![cmp(egfr(46.0, D), ">=")], NotMet),
        ("eGFR >45 cannot decide ≤ 45", vec![cmp(egfr(45.0, D), ">")], Unknown),
        ("eGFR <45", vec![cmp(egfr(45.0, D), "<")], Met),
        ("eGFR <60 cannot decide", vec![cmp(egfr(60.0, D), "<")], Unknown),
        ("eGFR valueString >60", vec![obs_text("98979-8", ">60", D)], NotMet),
        ("eGFR valueString <30", vec![obs_text("98979-8", "<30", D)], Met),
        // A bare number carries no unit and could be in any: unknown, never a guess.
        ("eGFR valueString 40 without a unit", vec![obs_text("98979-8", "40", D)], Unknown),
        (
            "eGFR valueString 40 with its unit",
            vec![obs_text("98979-8", "40 mL/min/1.73m2", D)],
            Met,
        ),
        ("eGFR comparator `ad`", vec![cmp(egfr(30.0, D), "ad")], Unknown),
    ];
    let res = table(Trial::T000, "cp", Pt::adult, "exc-1", &rows);
    reason_has(res.get("cp0"), "exc-1", "egfr ≥90", "bound shown");
    reason_has(res.get("cp2"), "exc-1", "is a bound that cannot decide", "undecided bound");
    reason_has(res.get("cp9"), "exc-1", "comparator `ad`", "bad comparator");
    reason_has(res.get("cp7"), "exc-1", "unit `(no unit)`", "bare number");
    assert_eq!(evidence(res.get("cp5"), "exc-1", "Observation/cp5-1").value, Some(json!(">60")));

    let bx = || biopsy("2026-03-01", &["IV"]);
    let rows: Vec<Row> = vec![
        ("UPCR <0.1", vec![bx(), cmp(upcr(0.1), "<")], NotMet),
        ("UPCR <2 cannot decide ≥ 1.5", vec![bx(), cmp(upcr(2.0), "<")], Unknown),
        ("UPCR <=1.5 cannot decide", vec![bx(), cmp(upcr(1.5), "<=")], Unknown),
        ("UPCR >=1.5", vec![bx(), cmp(upcr(1.5), ">=")], Met),
        ("UPCR >1.2 cannot decide", vec![bx(), cmp(upcr(1.2), ">")], Unknown),
    ];
    table(Trial::T000, "cu", Pt::adult, "inc-4b", &rows);
}

#[test]
fn blood_pressure_panel_components() {
    let trial = trial_yaml(&[
        ("sbp", "exclusion", "{lab: systolic-bp, op: \">=\", value: 140, unit: \"mm[Hg]\"}"),
        ("dbp", "exclusion", "{lab: diastolic-bp, op: \">=\", value: 90, unit: \"mm[Hg]\"}"),
    ]);
    let pts = vec![
        Pt::adult("bp1").add(bp_panel(150.0, 95.0, D).id("bp-high")),
        Pt::adult("bp2").add(bp_panel(139.0, 89.0, D)),
        Pt::adult("bp3")
            .add(bp_panel(120.0, 80.0, "2026-05-01"))
            .add(obs("8480-6", 141.0, "mmHg", D)),
    ];
    let res = screen(Trial::Yaml(&trial), &pts);
    expect(res.get("bp1"), "sbp", Met, "150");
    expect(res.get("bp1"), "dbp", Met, "95");
    expect(res.get("bp2"), "sbp", NotMet, "139");
    expect(res.get("bp2"), "dbp", NotMet, "89");
    expect(res.get("bp3"), "sbp", Met, "a newer standalone systolic wins");
    expect(res.get("bp3"), "dbp", NotMet, "diastolic from the panel");
    let e = evidence(res.get("bp1"), "sbp", "Observation/bp-high");
    assert_eq!(e.value, Some(json!(150.0)));
    assert_eq!(e.code.as_deref(), Some("loinc|8480-6"));
    assert_eq!(e.normalized_value, Some(150.0));
    assert_eq!(
        evidence(res.get("bp1"), "dbp", "Observation/bp-high").code.as_deref(),
        Some("loinc|8462-4")
    );
}

// =============================================================== CKD-EPI 2021 derivation

#[test]
fn ckd_epi_2021_derivation_end_to_end() {
    let cr = |v: f64, unit: &str| obs("2160-0", v, unit, D);
    // (description, patient, expected exc-1, expected derived eGFR)
    let rows: Vec<(&str, Pt, Outcome, Option<f64>)> = vec![
        (
            "female 40, Scr 1.0 mg/dL -> 73.0",
            Pt::adult("k0").add(cr(1.0, "mg/dL")),
            NotMet,
            Some(73.0),
        ),
        (
            "female 40, Scr 88.4 umol/L -> 73.0",
            Pt::adult("k1").add(cr(88.4, "umol/L")),
            NotMet,
            Some(73.0),
        ),
        (
            "male 55, Scr 1.09 -> 80.2",
            Pt::bare("k2").born("1971-01-01").gender("male").add(cr(1.09, "mg/dL")),
            NotMet,
            Some(80.2),
        ),
        (
            "male 30, Scr 2.0 -> 45.2 (just above 45)",
            Pt::bare("k3").born("1996-01-01").gender("male").add(cr(2.0, "mg/dL")),
            NotMet,
            Some(45.2),
        ),
        (
            "female 50, Scr 1.5 -> 42.2",
            Pt::bare("k4").born("1976-01-01").gender("female").add(cr(1.5, "mg/dL")),
            Met,
            Some(42.2),
        ),
        (
            "aged 16: not derived",
            Pt::bare("k5").born("2010-01-01").gender("female").add(cr(1.0, "mg/dL")),
            Unknown,
            None,
        ),
        (
            "17 at the creatinine test, 18 at screening: not derived",
            Pt::bare("k6").born("2008-05-25").gender("female").add(cr(1.0, "mg/dL")),
            Unknown,
            None,
        ),
        (
            "gender unknown: not derived",
            Pt::bare("k7").born("1986-01-15").gender("unknown").add(cr(1.0, "mg/dL")),
            Unknown,
            None,
        ),
        (
            "gender missing: not derived",
            Pt::bare("k8").born("1986-01-15").add(cr(1.0, "mg/dL")),
            Unknown,
            None,
        ),
        (
            "creatinine older than 90 days",
            Pt::adult("k9").add(obs("2160-0", 3.0, "mg/dL", "2026-02-01")),
            Unknown,
            None,
        ),
        (
            "Scr <0.5 gives eGFR at least ...",
            Pt::adult("k10").add(cmp(cr(0.5, "mg/dL"), "<")),
            NotMet,
            None,
        ),
        (
            "a reported eGFR wins over derivation",
            Pt::adult("k11").add_all([cr(3.0, "mg/dL"), egfr(60.0, "2026-05-01")]),
            NotMet,
            None,
        ),
    ];
    let pts: Vec<Pt> = rows.iter().map(|r| r.1.clone()).collect();
    let res = screen(Trial::T000, &pts);
    for (desc, pt, want, value) in &rows {
        let r = res.get(&pt.id);
        expect(r, "exc-1", *want, desc);
        if let Some(v) = value {
            reason_has(r, "exc-1", "by CKD-EPI 2021 from serum creatinine", desc);
            reason_has(r, "exc-1", "(derived)", desc);
            let f = r
                .facts
                .iter()
                .find(|f| f.name == "egfr")
                .unwrap_or_else(|| panic!("{desc}: no egfr fact"));
            let got = f.value.as_f64().unwrap();
            assert!((got - v).abs() < 0.05, "{desc}: derived {got}, expected {v}");
            assert_eq!(f.derived_from, [format!("Observation/{}-1", pt.id)], "{desc}");
        }
    }
    // The published vector to full precision, from both units.
    for id in ["k0", "k1"] {
        let f = res.get(id).facts.iter().find(|f| f.name == "egfr").unwrap();
        assert!((f.value.as_f64().unwrap() - 73.037_550_783_197_87).abs() < 1e-9, "{id}");
    }
    let e = evidence(res.get("k0"), "exc-1", "Observation/k0-1");
    assert_eq!(e.note.as_deref(), Some("serum creatinine used for CKD-EPI 2021 (age 40, female)"));
    reason_has(res.get("k5"), "exc-1", "validated for adults and the patient was 16", "age 16");
    reason_has(res.get("k6"), "exc-1", "the patient was 17 at the creatinine test", "age at test");
    reason_has(res.get("k7"), "exc-1", "needs sex male or female", "gender unknown");
    reason_has(res.get("k8"), "exc-1", "needs sex male or female", "gender missing");
    reason_has(res.get("k10"), "exc-1", "egfr ≥", "bound flips");
    assert!(!crit(res.get("k11"), "exc-1").reason.contains("derived"));
}

// =============================================================== decisions

#[test]
fn decisions_answer_manual_items_only() {
    let decisions = r#"
- {patient: d1, trial: NCT06406205, criterion: inc-1, answer: met, by: Dr A, at: "2026-05-30", note: consent signed}
- {patient: d1, trial: NCT06406205, criterion: inc-5, answer: met, by: Dr A, at: "2026-01-01", expires: "2026-05-31"}
- {patient: d1, trial: NCT06406205, criterion: inc-6, answer: met, by: Dr A, at: "2026-06-02"}
- {patient: d1, trial: NCT06406205, criterion: exc-2, answer: not-met, by: Dr A, at: "2026-05-01", expires: "2026-06-01"}
- {patient: d1, trial: NCT06406205, criterion: inc-2, answer: not-met, by: Dr A, at: "2026-05-01"}
- {patient: Patient/d2, trial: NCT06406205, criterion: exc-1, answer: met, by: Dr B, at: "2026-05-01"}
- {patient: d2, trial: OTHER, criterion: inc-1, answer: met, by: Dr B, at: "2026-05-01"}
- {patient: d3, trial: NCT06406205, criterion: exc-14, answer: met, by: Dr C, at: "2026-04-01"}
- {patient: d3, trial: NCT06406205, criterion: exc-14, answer: not-met, by: Dr D, at: "2026-05-15"}
"#;
    let pts = vec![Pt::adult("d1"), Pt::adult("d2"), Pt::adult("d3")];
    let res = Screen {
        decisions: Some(decisions),
        ..Screen::new(Trial::T000)
    }
    .run(&pts);
    let r = res.get("d1");
    expect(r, "inc-1", Met, "answered");
    let c = crit(r, "inc-1");
    assert!(
        c.reason
            .starts_with("answered met by Dr A on 2026-05-30: consent signed (computed: manual;"),
        "{}",
        c.reason
    );
    let applied = c.decision.as_ref().expect("decision shown");
    assert_eq!((applied.by.as_str(), applied.at.as_str()), ("Dr A", "2026-05-30"));
    expect(r, "inc-5", Manual, "expired the day before");
    assert!(crit(r, "inc-5").decision.is_none());
    expect(r, "inc-6", Manual, "answered after the screening date");
    expect(r, "exc-2", NotMet, "expires on the screening date: still in force");
    expect(r, "inc-2", Met, "data decided it; the note does not override");
    assert!(crit(r, "inc-2").decision.is_none());
    // An unknown criterion can be answered too, and then decides.
    let r = res.get("d2");
    expect(r, "exc-1", Met, "answered unknown");
    expect(r, "inc-1", Manual, "decision for another trial");
    assert_eq!(r.status, Status::Ineligible);
    assert_eq!(res.get("d3").status, Status::PotentiallyEligible);
    expect(res.get("d3"), "inc-1", Manual, "other patient");
    expect(res.get("d3"), "exc-14", NotMet, "the latest decision in force wins");
    assert_eq!(crit(res.get("d3"), "exc-14").decision.as_ref().map(|d| d.by.as_str()), Some("Dr D"));
}

/// Everything computable is clear and every manual item answered: eligible.
#[test]
fn complete_record_with_answers_is_eligible() {
    let pt = Pt::adult("full").add_all([
        sle(),
        biopsy("2026-03-01", &["IV"]),
        upcr(2.0),
        egfr(90.0, D),
        obs("1742-6", 20.0, "U/L", D),
        obs("1920-8", 22.0, "U/L", D),
        obs("1975-2", 0.6, "mg/dL", D),
        obs("6690-2", 6.1, "10*9/L", D),
        obs("751-8", 3.2, "10*9/L", D),
        obs("777-3", 250.0, "10*9/L", D),
        bp_panel(125.0, 78.0, D),
        obs_coded("2118-8", "260385009", D),
        obs_coded("2106-3", "260385009", D),
        med_request("200060", "2026-03-05"),
        immunization("141", "2025-10-01"),
        allergy(RXNORM, "7980"), // penicillin G: not a drug the trial names
    ]);
    let manual = [
        "inc-1", "inc-3", "inc-4a", "inc-5", "inc-6", "inc-7", "exc-2", "exc-3", "exc-4", "exc-5", "exc-6c", "exc-7a", "exc-7e", "exc-10",
        "exc-12", "exc-13", "exc-14",
    ];
    let res = screen(Trial::T000, std::slice::from_ref(&pt));
    let r = res.get("full");
    assert_eq!(r.status, Status::PotentiallyEligible);
    for c in &r.criteria {
        let want = if manual.contains(&c.id.as_str()) {
            Manual
        } else if c.kind == trialgate::criteria::Kind::Inclusion {
            Met
        } else {
            NotMet
        };
        assert_eq!(c.outcome, want, "{}: {}", c.id, c.reason);
    }
    let answers: String = manual
        .iter()
        .map(|id| {
            let answer = if id.starts_with("inc") { "met" } else { "not-met" };
            format!("- {{patient: full, trial: NCT06406205, criterion: {id}, answer: {answer}, by: coordinator, at: \"2026-05-31\"}}\n")
        })
        .collect();
    let res = Screen {
        decisions: Some(&answers),
        ..Screen::new(Trial::T000)
    }
    .run(&[pt]);
    let r = res.get("full");
    assert_eq!(
        r.status,
        Status::Eligible,
        "{:#?}",
        r.criteria.iter().map(|c| (&c.id, c.outcome)).collect::<Vec<_>>()
    );
    assert!(r.decided_by.is_empty());
}

// =============================================================== patient records and input shapes

#[test]
fn deceased_inactive_or_merged_records_are_ineligible() {
    let pts = vec![
        Pt::adult("r0").patient(json!({ "deceasedBoolean": true })),
        Pt::adult("r1").patient(json!({ "deceasedDateTime": "2026-04-02" })),
        Pt::adult("r2").patient(json!({ "active": false })),
        Pt::adult("r3").patient(json!({ "link": [{ "other": { "reference": "Patient/r9" }, "type": "replaced-by" }] })),
        Pt::adult("r4").patient(json!({ "deceasedBoolean": false, "active": true })),
        Pt::adult("r5").patient(json!({ "link": [{ "other": { "reference": "Patient/r8" }, "type": "seealso" }] })),
    ];
    let res = screen(Trial::T000, &pts);
    let want = [
        Some("deceased"),
        Some("deceased (2026-04-02)"),
        Some("inactive record (Patient.active is false)"),
        Some("merged: replaced by Patient/r9"),
        None,
        None,
    ];
    for (p, w) in pts.iter().zip(want) {
        let r = res.get(&p.id);
        assert_eq!(r.record.as_deref(), w, "{}", p.id);
        let status = if w.is_some() {
            Status::Ineligible
        } else {
            Status::PotentiallyEligible
        };
        assert_eq!(r.status, status, "{}", p.id);
    }
    // The record decides alone: no criterion is blamed.
    assert!(res.get("r0").decided_by.is_empty());
}

#[test]
fn transaction_bundle_with_urn_uuid_references_and_no_ids() {
    let entry = |url: &str, r: serde_json::Value| {
        let ty = r["resourceType"].as_str().unwrap().to_string();
        json!({ "fullUrl": url, "resource": r, "request": { "method": "POST", "url": ty } })
    };
    let subject = |p: &str| json!({ "subject": { "reference": p } });
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            entry("urn:uuid:aaaa-1", json!({ "resourceType": "Patient", "birthDate": "1980-02-02", "gender": "male" })),
            entry("urn:uuid:bbbb-2", json!({ "resourceType": "Patient", "birthDate": "1990-03-03", "gender": "female" })),
            entry("urn:uuid:obs-1", egfr(30.0, D).with(subject("urn:uuid:aaaa-1"))),
            entry("urn:uuid:obs-2", egfr(70.0, D).with(subject("urn:uuid:bbbb-2"))),
            entry("urn:uuid:obs-3", egfr(20.0, "2026-05-21").with(subject("urn:uuid:bbbb-2")).with(json!({ "status": "cancelled" }))),
        ],
    });
    let scratch = Scratch::new();
    let path = scratch.file("tx.json", &bundle.to_string());
    let cfg = trialgate::load_config(
        &manifest("mappings"),
        &manifest("config/trials"),
        &[manifest(T000).display().to_string()],
    )
    .unwrap();
    let s = trialgate::screen(&path, &cfg, date(AS_OF), &Default::default()).unwrap();
    assert!(s.issues.is_empty(), "{:?}", s.issues);
    assert_eq!(s.patients, 2);
    let keys: Vec<&str> = s.results.iter().map(|r| r.patient.as_str()).collect();
    assert_eq!(keys, ["urn:uuid:aaaa-1", "urn:uuid:bbbb-2"]);
    let a = &s.results[0];
    expect(a, "exc-1", Met, "patient A's eGFR 30");
    expect(a, "inc-2", Met, "age 46");
    assert_eq!(crit(a, "exc-1").evidence[0].resource, "urn:uuid:obs-1");
    let b = &s.results[1];
    expect(b, "exc-1", NotMet, "patient B's eGFR 70 (the cancelled 20 does not count)");
    assert_eq!(crit(b, "exc-1").evidence[0].resource, "urn:uuid:obs-2");
}

#[test]
fn ndjson_and_bundle_give_the_same_verdicts() {
    let pts = vec![
        Pt::adult("nd1").add_all([sle(), egfr(44.0, D), biopsy("2026-03-01", &["V"]), upcr(2.1)]),
        Pt::adult("nd2").add_all([egfr(46.0, D), obs("1742-6", 120.0, "U/L", D)]),
    ];
    let a = screen(Trial::T000, &pts);
    let b = Screen {
        ndjson: true,
        ..Screen::new(Trial::T000)
    }
    .run(&pts);
    for p in &pts {
        let (ra, rb) = (a.get(&p.id), b.get(&p.id));
        assert_eq!(ra.status, rb.status, "{}", p.id);
        for (ca, cb) in ra.criteria.iter().zip(&rb.criteria) {
            assert_eq!((&ca.id, ca.outcome, &ca.reason), (&cb.id, cb.outcome, &cb.reason), "{}", p.id);
        }
    }
    expect(a.get("nd1"), "inc-4b", Met, "class V, UPCR 2.1");
    expect(a.get("nd1"), "exc-1", Met, "eGFR 44");
    expect(a.get("nd2"), "exc-7b", Manual, "ALT 3× ULN");
}

// =============================================================== trial 000, condition and drug exclusions

#[test]
fn t000_condition_and_medication_exclusions() {
    // Every patient has an SLE Condition and an unrelated current drug, so "no records at all"
    // never applies and each row's own resources decide.
    let base = |id: &str| Pt::adult(id).add_all([sle(), med_request("979092", "2026-01-10")]);
    let c = |code: &str| condition(ICD10CM, code);
    let dated = |code: &str, onset: &str, abated: Option<&str>| {
        let x = c(code).with(json!({ "onsetDateTime": onset }));
        match abated {
            Some(a) => clinical(x, "resolved").with(json!({ "abatementDateTime": a })),
            None => x,
        }
    };
    let t = Trial::T000;

    let rows: Vec<Row> = vec![
        ("alcohol dependence, active", vec![dated("F10.20", "2019-01-01", None)], Met),
        (
            "abuse that ended 2023-01-01, before the 2-year window",
            vec![dated("F10.10", "2019-01-01", Some("2023-01-01"))],
            NotMet,
        ),
        (
            "abuse that ended 2025-01-01, inside the window",
            vec![dated("F10.10", "2019-01-01", Some("2025-01-01"))],
            Met,
        ),
        ("none", vec![], NotMet),
    ];
    table(t, "x6a", base, "exc-6a", &rows);

    let rows: Vec<Row> = vec![
        ("breast cancer, active since 2015", vec![dated("C50.911", "2015-01-01", None)], Met),
        (
            "breast cancer resolved in 2019",
            vec![dated("C50.911", "2015-01-01", Some("2019-01-01"))],
            NotMet,
        ),
        (
            "breast cancer 2022-2023",
            vec![dated("C50.911", "2022-01-01", Some("2023-01-01"))],
            Met,
        ),
        (
            "basal cell carcinoma of skin 2025: allowed only if excised",
            vec![dated("C44.01", "2025-01-01", None)],
            Manual,
        ),
        (
            "melanoma in situ D03.9 is not a malignancy here",
            vec![dated("D03.9", "2025-01-01", None)],
            NotMet,
        ),
        // It ended at some unknown time since 2015: maybe within the last 5 years.
        (
            "breast cancer since 2015, resolved, no end date",
            vec![clinical(dated("C50.911", "2015-01-01", None), "resolved")],
            Unknown,
        ),
        (
            "breast cancer since 2015, in remission",
            vec![clinical(dated("C50.911", "2015-01-01", None), "remission")],
            Unknown,
        ),
        (
            "breast cancer since 2015, abatementBoolean",
            vec![clinical(dated("C50.911", "2015-01-01", None), "resolved").with(json!({ "abatementBoolean": true }))],
            Unknown,
        ),
    ];
    let res = table(t, "x6b", base, "exc-6b", &rows);
    reason_has(
        res.get("x6b3"),
        "exc-6b",
        "needs review: basal or squamous cell skin carcinoma",
        "skin",
    );
    reason_has(res.get("x6b5"), "exc-6b", "no end date", "unknown end");

    let rows: Vec<Row> = vec![
        ("HIV, even resolved", vec![clinical(c("B20"), "resolved")], Met),
        // Antivirals may be prophylaxis or treat a carrier state: a person confirms "severe".
        (
            "CMV with ganciclovir within 3 months",
            vec![dated("B25.9", "2026-04-01", None), med_request("4678", "2026-04-02")],
            Manual,
        ),
        ("CMV without an antiviral", vec![dated("B25.9", "2026-04-01", None)], Manual),
        (
            "hepatitis C cured in 2020",
            vec![dated("B18.2", "2015-01-01", Some("2020-01-01"))],
            NotMet,
        ),
    ];
    let res = table(t, "x6d", base, "exc-6d", &rows);
    reason_has(
        res.get("x6d2"),
        "exc-6d",
        "needs review: a viral infection within 3 months",
        "CMV review",
    );

    let isoniazid = || med_request("198368", "2026-01-10");
    let rows: Vec<Row> = vec![
        ("active tuberculosis", vec![c("A15.0")], Met),
        // No isoniazid on record may mean prophylaxis given elsewhere: a person confirms.
        ("old TB without isoniazid", vec![c("Z86.15")], Manual),
        ("old TB on isoniazid", vec![c("Z86.15"), isoniazid()], NotMet),
        (
            "old TB, isoniazid course ended last year",
            vec![
                c("Z86.15"),
                isoniazid().with(json!({ "status": "completed", "dispenseRequest": { "validityPeriod": {
                    "start": "2025-01-01", "end": "2025-07-01" } } })),
            ],
            NotMet, // prophylaxis was taken: "if not taking prophylaxis" does not apply
        ),
        ("no TB", vec![], NotMet),
    ];
    table(t, "x6e", base, "exc-6e", &rows);

    let rows: Vec<Row> = vec![
        (
            "asthma with oral prednisone (product 312615)",
            vec![c("J45.909"), med_statement("312615", "2026-05-01")],
            Manual, // the steroid may be for the lupus: a person confirms
        ),
        (
            "asthma with IV methylprednisolone only",
            vec![c("J45.909"), med_statement("1743704", "2026-05-01")],
            NotMet,
        ),
        (
            "COPD with prednisone, route not recorded",
            vec![c("J44.9"), med_statement("8640", "2026-05-01")],
            Unknown,
        ),
        (
            "oral prednisone without COPD or asthma",
            vec![med_statement("312615", "2026-05-01")],
            NotMet,
        ),
        (
            "asthma with a completed oral prednisone course 4 months ago",
            vec![
                c("J45.909"),
                med_statement("312615", "2026-01-15").with(json!({ "status": "completed" })),
            ],
            NotMet,
        ),
        (
            "asthma, prednisone statement active since 4 months ago (still taking)",
            vec![c("J45.909"), med_statement("312615", "2026-01-15")],
            Manual,
        ),
    ];
    table(t, "x7c", base, "exc-7c", &rows);

    let rows: Vec<Row> = vec![
        ("ESRD on dialysis Z99.2", vec![c("Z99.2")], Met),
        ("haemodialysis 10 days ago", vec![procedure(CPT, "90935", &days_before(10))], Met),
        ("nothing recorded: expected dialysis is a judgment", vec![], Manual),
    ];
    table(t, "x3", base, "exc-3", &rows);

    let rows: Vec<Row> = vec![
        (
            "kidney transplant status, resolved (history counts)",
            vec![clinical(c("Z94.0"), "resolved")],
            Met,
        ),
        ("kidney transplant in 2010", vec![procedure(CPT, "50360", "2010-03-01")], Met),
        ("liver transplant status is not a kidney transplant", vec![c("Z94.4")], Manual),
    ];
    table(t, "x4", base, "exc-4", &rows);

    let rows: Vec<Row> = vec![
        ("systemic sclerosis", vec![c("M34.1")], Manual),
        ("Sjögren's syndrome is allowed", vec![c("M35.00")], NotMet),
        ("none", vec![], NotMet),
    ];
    table(t, "x8", base, "exc-8", &rows);

    let rows: Vec<Row> = vec![
        ("lymphoma", vec![c("C83.30")], Met),
        ("none: irradiation still needs a person", vec![], Manual),
    ];
    table(t, "x6c", base, "exc-6c", &rows);
}

#[test]
fn uln_reference_range_by_sex_and_type() {
    let ranged = |v: f64| {
        obs("1742-6", v, "U/L", D).with(json!({ "referenceRange": [
            { "high": { "value": 50, "unit": "U/L" }, "appliesTo": [coding(SNOMED, "248153007")] },
            { "high": { "value": 10, "unit": "U/L" }, "type": coding(
                "http://terminology.hl7.org/CodeSystem/referencerange-meaning", "therapeutic") },
            { "high": { "value": 40, "unit": "U/L" }, "appliesTo": [coding(SNOMED, "248152002")] },
        ] }))
    };
    let trial = trial_yaml(&[("alt", "exclusion", "{lab: alt, ratio: uln, op: \">=\", value: 2.5}")]);
    let pts = vec![
        Pt::adult("woman").add(ranged(100.0)),
        Pt::bare("man").born("1980-01-01").gender("male").add(ranged(100.0)),
    ];
    let res = screen(Trial::Yaml(&trial), &pts);
    expect(res.get("woman"), "alt", Met, "female range high 40: 2.5×");
    expect(res.get("man"), "alt", NotMet, "male range high 50: 2×");
    let f = res.get("man").facts.iter().find(|f| f.name == "alt_x_uln").expect("ratio fact");
    assert_eq!(f.value, json!(2.0));
}

// =============================================================== other rule parameters

#[test]
fn total_dose_of_iv_pulses() {
    let trial = trial_yaml(&[(
        "pulse",
        "inclusion",
        "{medication: methylprednisolone, route: intravenous, within: 2w, total_dose: {min: 1.5, max: 3.0, unit: g}}",
    )]);
    let pulse = |days: i64, mg: f64| {
        med_admin(RXNORM, "1743704", &days_before(days), "47625008")
            .with(json!({ "dosage": { "route": coding(SNOMED, "47625008"), "dose": { "value": mg, "unit": "mg" } } }))
    };
    let rows: Vec<Row> = vec![
        ("3 × 500 mg = 1.5 g", vec![pulse(1, 500.0), pulse(2, 500.0), pulse(3, 500.0)], Met),
        ("2 × 500 mg = 1.0 g", vec![pulse(1, 500.0), pulse(2, 500.0)], NotMet),
        (
            "3 × 1000 mg = 3.0 g",
            vec![pulse(1, 1000.0), pulse(2, 1000.0), pulse(3, 1000.0)],
            Met,
        ),
        (
            "3 × 1000 mg + 500 mg = 3.5 g",
            vec![pulse(1, 1000.0), pulse(2, 1000.0), pulse(3, 1000.0), pulse(4, 500.0)],
            NotMet,
        ),
        (
            "a pulse 15 days ago does not count",
            vec![pulse(1, 1000.0), pulse(15, 1000.0)],
            NotMet,
        ),
        (
            "a pulse without a dose makes the total unknown",
            vec![
                pulse(1, 1000.0),
                pulse(2, 1000.0).with(json!({ "dosage": { "route": coding(SNOMED, "47625008") } })),
            ],
            Unknown,
        ),
        (
            "an order is not an administration",
            vec![med_request("1743704", &days_before(1)), pulse(1, 1000.0)],
            NotMet,
        ),
    ];
    let res = table(Trial::Yaml(&trial), "dose", Pt::adult, "pulse", &rows);
    reason_has(
        res.get("dose0"),
        "pulse",
        "3 administration(s), total 1.5 g (required 1.5–3 g)",
        "total",
    );
}

#[test]
fn unconvertible_units_can_be_ignored_per_rule() {
    let trial = trial_yaml(&[
        (
            "strict",
            "exclusion",
            "{lab: egfr, op: \"<=\", value: 45, unit: \"mL/min/{1.73_m2}\"}",
        ),
        (
            "lenient",
            "exclusion",
            "{lab: egfr, op: \"<=\", value: 45, unit: \"mL/min/{1.73_m2}\", unconvertible_units: ignore}",
        ),
    ]);
    let pts = vec![Pt::adult("uu").add_all([egfr(30.0, "2026-05-01"), obs("98979-8", 80.0, "mL/min", D)])];
    let res = screen(Trial::Yaml(&trial), &pts);
    expect(res.get("uu"), "strict", Unknown, "latest value in mL/min");
    expect(res.get("uu"), "lenient", Met, "older convertible value decides");
}

#[test]
fn substitute_bmi_and_jsonpath_values() {
    let trial = trial_yaml(&[
        (
            "prot",
            "inclusion",
            "{lab: urine-protein-24h, op: \">=\", value: 1.0, unit: \"g/(24.h)\", substitute: upcr}",
        ),
        ("bmi", "exclusion", "{lab: bmi, op: \"<\", value: 16, unit: kg/m2}"),
        ("sledai", "inclusion", "{lab: sledai, op: \">\", value: 10, unit: \"{score}\"}"),
    ]);
    let sledai_ext = |total: i64| {
        json!({
            "resourceType": "Observation",
            "status": "final",
            "code": coding("http://trialgate.example.org/fhir/CodeSystem/scores", "sledai-2k"),
            "effectiveDateTime": D,
            "extension": [{
                "url": "http://trialgate.example.org/fhir/StructureDefinition/sledai-total",
                "valueInteger": total,
            }],
        })
    };
    let pts = vec![
        Pt::adult("s1").add_all([
            upcr(1.2),
            obs("29463-7", 45.0, "kg", D),
            obs("8302-2", 170.0, "cm", "2020-01-01"),
            sledai_ext(12),
        ]),
        Pt::adult("s2").add_all([
            obs("2889-4", 0.8, "g/(24.h)", D),
            upcr(1.2),
            obs("29463-7", 154.0, "[lb_av]", D),
            obs("8302-2", 67.0, "[in_i]", "2020-01-01"),
            sledai_ext(10),
        ]),
        Pt::adult("s3").add(obs("29463-7", 45.0, "kg", D)),
    ];
    let res = screen(Trial::Yaml(&trial), &pts);
    expect(res.get("s1"), "prot", Met, "UPCR stands in for 24-h protein");
    reason_has(
        res.get("s1"),
        "prot",
        "upcr 1.2 mg/mg used in place of urine-protein-24h, as this trial allows",
        "substitute",
    );
    expect(res.get("s2"), "prot", NotMet, "a real 24-h value wins over the substitute");
    expect(res.get("s1"), "bmi", Met, "45 kg / 1.70 m² = 15.6");
    reason_has(res.get("s1"), "bmi", "bmi 15.571 kg/m2 from weight 45 kg", "BMI");
    expect(res.get("s2"), "bmi", NotMet, "154 lb, 67 in = 24.1");
    expect(res.get("s3"), "bmi", Unknown, "no height");
    reason_has(res.get("s3"), "bmi", "no height recorded", "no height");
    expect(res.get("s1"), "sledai", Met, "SLEDAI 12 from the extension");
    expect(res.get("s2"), "sledai", NotMet, "SLEDAI 10 is not > 10");
}

#[test]
fn condition_onset_before() {
    let trial = trial_yaml(&[("sle-12w", "inclusion", "{condition: sle, onset_before: 12w}")]);
    let onset = |d: &str| sle().with(json!({ "onsetDateTime": d }));
    let rows: Vec<Row> = vec![
        ("onset exactly 12 weeks before (2026-03-09)", vec![onset("2026-03-09")], Met),
        ("onset late on that day", vec![onset("2026-03-09T23:00:00Z")], Met),
        ("onset 2026-03-10", vec![onset("2026-03-10")], NotMet),
        (
            "no onset, recordedDate long ago",
            vec![sle().with(json!({ "onsetDateTime": null, "recordedDate": "2024-01-01" }))],
            Met,
        ),
        (
            "no onset and no recordedDate",
            vec![sle().with(json!({ "onsetDateTime": null }))],
            Unknown,
        ),
        ("old but resolved", vec![clinical(onset("2020-01-01"), "resolved")], NotMet),
    ];
    table(Trial::Yaml(&trial), "ob", Pt::adult, "sle-12w", &rows);
}

#[test]
fn t000_inc7_by_administrative_gender() {
    let neg = || obs_coded("2118-8", "260385009", D);
    let pts = vec![
        Pt::adult("female").add(neg()),
        Pt::bare("male").born("1986-01-15").gender("male"),
        Pt::bare("unknown").born("1986-01-15").gender("unknown"),
        Pt::bare("missing").born("1986-01-15"),
        Pt::adult("positive").add(obs_coded("2118-8", "10828004", D)),
    ];
    let res = screen(Trial::T000, &pts);
    expect(
        res.get("female"),
        "inc-7",
        Manual,
        "woman, negative hCG: childbearing potential is asked",
    );
    expect(res.get("male"), "inc-7", Manual, "man: contraception is asked");
    reason_has(res.get("male"), "inc-7", "agreement to contraception", "male review");
    expect(res.get("positive"), "inc-7", NotMet, "positive serum hCG fails it");
    // `unknown` is FHIR's "a proper value is applicable, but not known": missing, not a third sex.
    expect(res.get("unknown"), "inc-7", Manual, "gender unknown");
    expect(res.get("missing"), "inc-7", Manual, "gender missing");
    assert_eq!(res.get("unknown").status, Status::PotentiallyEligible);
    expect(res.get("positive"), "inc-7", NotMet, "positive serum hCG");
}
