//! A small fixture builder for engine tests: FHIR R4 JSON for one or many patients, written
//! as a Bundle (or NDJSON) into a scratch folder, screened through the library, and helpers
//! to read the verdicts back.
//!
//! Resources are plain `serde_json::Value`s built by the constructors below and adjusted
//! with [`Patch::with`] (a shallow merge; `null` removes a key), so a table row can say
//! "this Observation, but preliminary" in one expression.

#![allow(dead_code)] // each test binary uses a different part of the builder

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use trialgate::criteria::Outcome;
use trialgate::criteria::decisions::Decisions;
use trialgate::criteria::eval::{CriterionResult, Evidence, TrialResult};
use trialgate::time::Date;

pub const AS_OF: &str = "2026-06-01";
pub const LOINC: &str = "http://loinc.org";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const ICD10CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
pub const ICD10_WHO: &str = "http://hl7.org/fhir/sid/icd-10";
pub const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub const ATC: &str = "http://www.whocc.no/atc";
pub const CVX: &str = "http://hl7.org/fhir/sid/cvx";
pub const CPT: &str = "http://www.ama-assn.org/go/cpt";
pub const UCUM: &str = "http://unitsofmeasure.org";
pub const T000: &str = "config/trials/000-NCT06406205.yaml";

/// Shallow JSON merge for building variants of a resource.
pub trait Patch {
    /// Sets every key of `patch` (an object) on `self`; a `null` value removes the key.
    fn with(self, patch: Value) -> Value;
    fn id(self, id: &str) -> Value;
}

impl Patch for Value {
    fn with(mut self, patch: Value) -> Value {
        let obj = self.as_object_mut().expect("patch target is an object");
        for (k, v) in patch.as_object().expect("patch is an object") {
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        self
    }

    fn id(self, id: &str) -> Value {
        self.with(json!({ "id": id }))
    }
}

pub fn date(s: &str) -> Date {
    Date::parse(s).unwrap_or_else(|| panic!("bad test date {s}"))
}

/// `YYYY-MM-DD` of the day `n` days before the screening date.
pub fn days_before(n: i64) -> String {
    date(AS_OF).add_days(-n).to_string()
}

pub fn coding(system: &str, code: &str) -> Value {
    json!({ "coding": [{ "system": system, "code": code }] })
}

fn status_cc(system: &str, code: &str) -> Value {
    json!({ "coding": [{ "system": format!("http://terminology.hl7.org/CodeSystem/{system}"), "code": code }] })
}

// ---------------------------------------------------------------- Observations

/// A final LOINC Observation with a valueQuantity (`unit` in both `unit` and `code`; an empty
/// unit leaves the quantity without one).
pub fn obs(loinc: &str, value: f64, unit: &str, when: &str) -> Value {
    obs_in(LOINC, loinc, value, unit, when)
}

pub fn obs_in(system: &str, code: &str, value: f64, unit: &str, when: &str) -> Value {
    let mut q = json!({ "value": value });
    if !unit.is_empty() {
        q["unit"] = json!(unit);
        q["system"] = json!(UCUM);
        q["code"] = json!(unit);
    }
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": coding(system, code),
        "effectiveDateTime": when,
        "valueQuantity": q,
    })
}

/// The same Observation with `valueQuantity.comparator` set.
pub fn cmp(o: Value, comparator: &str) -> Value {
    let mut q = o["valueQuantity"].clone();
    q["comparator"] = json!(comparator);
    o.with(json!({ "valueQuantity": q }))
}

/// A final LOINC Observation with a valueString.
pub fn obs_text(loinc: &str, text: &str, when: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": coding(LOINC, loinc),
        "effectiveDateTime": when,
        "valueString": text,
    })
}

/// A final LOINC Observation with a coded (SNOMED) value: hCG negative is 260385009.
pub fn obs_coded(loinc: &str, snomed: &str, when: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": coding(LOINC, loinc),
        "effectiveDateTime": when,
        "valueCodeableConcept": coding(SNOMED, snomed),
    })
}

/// A value-less Observation, as feeds send a test that was not resulted.
pub fn obs_absent(loinc: &str, when: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": coding(LOINC, loinc),
        "effectiveDateTime": when,
        "dataAbsentReason": status_cc("data-absent-reason", "not-performed"),
    })
}

/// Adds a `referenceRange` with only `high` (an empty unit leaves it unitless).
pub fn high(o: Value, value: f64, unit: &str) -> Value {
    let h = if unit.is_empty() {
        json!({ "value": value })
    } else {
        json!({ "value": value, "unit": unit, "system": UCUM, "code": unit })
    };
    o.with(json!({ "referenceRange": [{ "high": h }] }))
}

/// A blood-pressure panel (85354-9) with systolic and diastolic components in mmHg.
pub fn bp_panel(systolic: f64, diastolic: f64, when: &str) -> Value {
    let comp = |code: &str, v: f64| {
        json!({
            "code": coding(LOINC, code),
            "valueQuantity": { "value": v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]" },
        })
    };
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": coding(LOINC, "85354-9"),
        "effectiveDateTime": when,
        "component": [comp("8480-6", systolic), comp("8462-4", diastolic)],
    })
}

// ---------------------------------------------------------------- Conditions

/// An active, confirmed Condition with onset 2020-01-01.
pub fn condition(system: &str, code: &str) -> Value {
    json!({
        "resourceType": "Condition",
        "clinicalStatus": status_cc("condition-clinical", "active"),
        "verificationStatus": status_cc("condition-ver-status", "confirmed"),
        "code": coding(system, code),
        "onsetDateTime": "2020-01-01",
    })
}

pub fn sle() -> Value {
    condition(SNOMED, "55464009")
}

pub fn clinical(c: Value, status: &str) -> Value {
    c.with(json!({ "clinicalStatus": status_cc("condition-clinical", status) }))
}

pub fn verification(c: Value, status: &str) -> Value {
    c.with(json!({ "verificationStatus": status_cc("condition-ver-status", status) }))
}

// ---------------------------------------------------------------- Medications

/// An active order for an RxNorm drug, authored on `authored`, with no end.
pub fn med_request(rxnorm: &str, authored: &str) -> Value {
    json!({
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": coding(RXNORM, rxnorm),
        "authoredOn": authored,
    })
}

pub fn med_statement(rxnorm: &str, when: &str) -> Value {
    json!({
        "resourceType": "MedicationStatement",
        "status": "active",
        "medicationCodeableConcept": coding(RXNORM, rxnorm),
        "effectiveDateTime": when,
    })
}

/// A completed administration; `route` is a SNOMED route code (47625008 IV, 26643006 oral) or "".
pub fn med_admin(system: &str, code: &str, when: &str, route: &str) -> Value {
    let mut r = json!({
        "resourceType": "MedicationAdministration",
        "status": "completed",
        "medicationCodeableConcept": coding(system, code),
        "effectiveDateTime": when,
    });
    if !route.is_empty() {
        r["dosage"] = json!({ "route": coding(SNOMED, route), "dose": { "value": 1, "unit": "g", "system": UCUM, "code": "g" } });
    }
    r
}

// ---------------------------------------------------------------- Other events

pub fn procedure(system: &str, code: &str, when: &str) -> Value {
    json!({
        "resourceType": "Procedure",
        "status": "completed",
        "code": coding(system, code),
        "performedDateTime": when,
    })
}

pub fn immunization(cvx: &str, when: &str) -> Value {
    json!({
        "resourceType": "Immunization",
        "status": "completed",
        "vaccineCode": coding(CVX, cvx),
        "occurrenceDateTime": when,
    })
}

pub fn allergy(system: &str, code: &str) -> Value {
    json!({
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": status_cc("allergyintolerance-clinical", "active"),
        "verificationStatus": status_cc("allergyintolerance-verification", "confirmed"),
        "code": coding(system, code),
    })
}

/// SNOMED codes of the ISN/RPS lupus nephritis classes (mappings/conditions.yaml).
pub fn ln_class(class: &str) -> &'static str {
    match class {
        "I" => "73286009",
        "II" => "4676006",
        "III" => "76521009",
        "IV" => "36402006",
        "V" => "52042003",
        "VI" => "11013005",
        other => panic!("no LN class {other}"),
    }
}

/// A final kidney-biopsy pathology report whose conclusionCode gives the ISN/RPS classes.
pub fn biopsy(when: &str, classes: &[&str]) -> Value {
    let concl: Vec<Value> = classes.iter().map(|c| coding(SNOMED, ln_class(c))).collect();
    json!({
        "resourceType": "DiagnosticReport",
        "status": "final",
        "code": coding(SNOMED, "40134000"),
        "effectiveDateTime": when,
        "conclusionCode": concl,
    })
}

// ---------------------------------------------------------------- Patients

/// One patient and the resources about them.
#[derive(Clone)]
pub struct Pt {
    pub id: String,
    patient: Value,
    resources: Vec<Value>,
}

impl Pt {
    /// A Patient with only an id.
    pub fn bare(id: &str) -> Pt {
        Pt {
            id: id.to_string(),
            patient: json!({ "resourceType": "Patient", "id": id }),
            resources: Vec::new(),
        }
    }

    /// A woman aged 40 on the screening date (born 1986-01-15).
    pub fn adult(id: &str) -> Pt {
        Pt::bare(id).born("1986-01-15").gender("female")
    }

    pub fn born(self, birth_date: &str) -> Pt {
        self.patient(json!({ "birthDate": birth_date }))
    }

    pub fn gender(self, g: &str) -> Pt {
        self.patient(json!({ "gender": g }))
    }

    /// Merges `patch` into the Patient resource.
    pub fn patient(mut self, patch: Value) -> Pt {
        self.patient = self.patient.with(patch);
        self
    }

    /// Adds a resource about this patient, giving it an id (`<patient>-<n>`) if it has none
    /// and pointing its subject (or patient) at this patient.
    pub fn add(mut self, r: Value) -> Pt {
        let mut r = r;
        if r.get("id").is_none() {
            r["id"] = json!(format!("{}-{}", self.id, self.resources.len() + 1));
        }
        let field = match r["resourceType"].as_str() {
            Some("Immunization" | "AllergyIntolerance") => "patient",
            _ => "subject",
        };
        r[field] = json!({ "reference": format!("Patient/{}", self.id) });
        self.resources.push(r);
        self
    }

    pub fn add_all(self, rs: impl IntoIterator<Item = Value>) -> Pt {
        rs.into_iter().fold(self, Pt::add)
    }

    pub fn key(&self) -> String {
        format!("Patient/{}", self.id)
    }

    fn all(&self) -> impl Iterator<Item = &Value> {
        std::iter::once(&self.patient).chain(self.resources.iter())
    }
}

// ---------------------------------------------------------------- Scratch folders

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique folder under the system temp dir, removed when dropped.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("trialgate-engine-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }

    /// Writes every patient into one `collection` Bundle.
    pub fn bundle(&self, pts: &[Pt]) -> PathBuf {
        let entry: Vec<Value> = pts.iter().flat_map(Pt::all).map(|r| json!({ "resource": r })).collect();
        let b = json!({ "resourceType": "Bundle", "type": "collection", "entry": entry });
        self.file("bundle.json", &serde_json::to_string_pretty(&b).expect("json"))
    }

    /// Writes every resource of every patient as NDJSON into a `data/` folder.
    pub fn ndjson(&self, pts: &[Pt]) -> PathBuf {
        let dir = self.dir.join("data");
        std::fs::create_dir_all(&dir).expect("create ndjson dir");
        let text: String = pts.iter().flat_map(Pt::all).map(|r| format!("{r}\n")).collect();
        std::fs::write(dir.join("all.ndjson"), text).expect("write ndjson");
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- Screening

/// Which trial to screen against.
#[derive(Clone, Copy)]
pub enum Trial<'a> {
    /// config/trials/000-NCT06406205.yaml
    T000,
    /// A trial file written from this YAML text (see [`trial_yaml`]).
    Yaml(&'a str),
}

pub fn manifest(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A small trial file: `criteria` are (id, kind, rule as flow YAML).
pub fn trial_yaml(criteria: &[(&str, &str, &str)]) -> String {
    let mut s = String::from("id: TEST\ntitle: engine test trial\nsource: tests/engine.rs\ncriteria:\n");
    for (id, kind, rule) in criteria {
        s.push_str(&format!("  - id: {id}\n    kind: {kind}\n    text: \"{id}\"\n    rule: {rule}\n"));
    }
    s
}

/// Every patient's result, by patient id.
pub struct Results(pub BTreeMap<String, TrialResult>);

impl Results {
    #[track_caller]
    pub fn get(&self, id: &str) -> &TrialResult {
        self.0
            .get(&format!("Patient/{id}"))
            .unwrap_or_else(|| panic!("no result for patient {id}; have {:?}", self.0.keys().collect::<Vec<_>>()))
    }
}

pub struct Screen<'a> {
    pub trial: Trial<'a>,
    pub as_of: &'a str,
    pub decisions: Option<&'a str>,
    pub ndjson: bool,
}

impl<'a> Screen<'a> {
    pub fn new(trial: Trial<'a>) -> Screen<'a> {
        Screen {
            trial,
            as_of: AS_OF,
            decisions: None,
            ndjson: false,
        }
    }

    pub fn run(&self, pts: &[Pt]) -> Results {
        let scratch = Scratch::new();
        let trial_path = match self.trial {
            Trial::T000 => manifest(T000),
            Trial::Yaml(text) => scratch.file("trial.yaml", text),
        };
        let cfg = trialgate::load_config(
            &manifest("mappings"),
            &manifest("config/trials"),
            &[trial_path.display().to_string()],
        )
        .unwrap_or_else(|e| panic!("config does not load:\n{e}"));
        let decisions = match self.decisions {
            Some(text) => Decisions::load(&scratch.file("decisions.yaml", text)).unwrap_or_else(|e| panic!("decisions: {e}")),
            None => Decisions::default(),
        };
        let input = if self.ndjson { scratch.ndjson(pts) } else { scratch.bundle(pts) };
        let s = trialgate::screen(&input, &cfg, date(self.as_of), &decisions).unwrap_or_else(|e| panic!("screen: {e}"));
        assert!(s.issues.is_empty(), "the fixture itself has input issues: {:?}", s.issues);
        assert_eq!(s.patients, pts.len(), "every fixture patient is screened");
        Results(s.results.into_iter().map(|r| (r.patient.clone(), r)).collect())
    }
}

pub fn screen(trial: Trial, pts: &[Pt]) -> Results {
    Screen::new(trial).run(pts)
}

#[track_caller]
pub fn crit<'a>(r: &'a TrialResult, id: &str) -> &'a CriterionResult {
    r.criteria
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{}: no criterion {id}", r.patient))
}

/// Asserts one criterion's outcome, showing the reason on failure.
#[track_caller]
pub fn expect(r: &TrialResult, id: &str, want: Outcome, desc: &str) {
    let c = crit(r, id);
    assert_eq!(
        c.outcome,
        want,
        "{desc}: {id} is {} but expected {}; reason: {}",
        c.outcome.as_str(),
        want.as_str(),
        c.reason
    );
}

#[track_caller]
pub fn reason_has(r: &TrialResult, id: &str, needle: &str, desc: &str) {
    let c = crit(r, id);
    assert!(c.reason.contains(needle), "{desc}: {id} reason lacks `{needle}`: {}", c.reason);
}

/// The evidence item of a criterion that points at `resource`.
#[track_caller]
pub fn evidence<'a>(r: &'a TrialResult, id: &str, resource: &str) -> &'a Evidence {
    let c = crit(r, id);
    c.evidence
        .iter()
        .find(|e| e.resource == resource)
        .unwrap_or_else(|| panic!("{id}: no evidence from {resource}; have {:?}", c.evidence))
}

/// A table row: a description, the resources added to the row's patient, the expected outcome.
pub type Row = (&'static str, Vec<Value>, Outcome);

/// Screens one patient per row (ids `<tag>0`, `<tag>1`...: built by `base`, plus the row's
/// resources) and checks criterion `id` of each. Returns the results for further checks.
#[track_caller]
pub fn table(trial: Trial, tag: &str, base: impl Fn(&str) -> Pt, id: &str, rows: &[Row]) -> Results {
    let pts: Vec<Pt> = rows
        .iter()
        .enumerate()
        .map(|(i, (_, rs, _))| base(&format!("{tag}{i}")).add_all(rs.iter().cloned()))
        .collect();
    let res = screen(trial, &pts);
    for (i, (desc, _, want)) in rows.iter().enumerate() {
        expect(res.get(&format!("{tag}{i}")), id, *want, desc);
    }
    res
}
