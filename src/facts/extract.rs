//! Reduces resources into a patient's [`PatientFacts`], one at a time, applying each resource
//! type's validity rules. Pure: the same resources and mappings give the same facts.

use super::mappings::{Mappings, SystemCode};
use super::*;
use crate::fhir::Resource;
use crate::fhir::model::*;
use crate::fhir::record::MedicationIndex;
use crate::time::{Date, parse_fhir_instant, parse_fhir_range};

const OBS_VALID: &[&str] = &["final", "amended", "corrected"];

/// Adds what one resource says to a patient's facts. `demo` is the patient's, which some
/// readings depend on (sex- and age-specific reference ranges).
/// `spans`, when given, is the time span per lab in which a value can matter (see
/// `criteria::eval::lab_spans`): values outside it are not even built.
#[allow(clippy::too_many_arguments)]
pub fn extract_one(
    reference: &str,
    resource: &Resource,
    demo: &Basics,
    meds: &MedicationIndex,
    m: &Mappings,
    spans: Option<&[Option<crate::time::Window>]>,
    unmapped: &mut Unmapped,
    f: &mut PatientFacts,
) {
    match resource {
        Resource::Observation(o, raw) => {
            f.present.observations = true;
            let fields = ObservationFields::of(o);
            observation(reference, &fields, raw.as_deref(), demo, m, spans, unmapped, &mut f.labs);
        }
        Resource::Condition(c) => {
            f.present.conditions = true;
            if let Some(c) = condition(reference, c, m, unmapped) {
                f.conditions.push(c);
            }
        }
        Resource::MedicationRequest(r) => {
            f.present.medications = true;
            if let Some(x) = medication_request(reference, r, meds, m, unmapped) {
                f.medications.push(x);
            }
        }
        Resource::MedicationStatement(r) => {
            f.present.medications = true;
            if let Some(x) = medication_statement(reference, r, meds, m, unmapped) {
                f.medications.push(x);
            }
        }
        Resource::MedicationAdministration(r) => {
            f.present.medications = true;
            if let Some(x) = medication_administration(reference, r, meds, m, unmapped) {
                f.medications.push(x);
            }
        }
        Resource::Procedure(p) => {
            f.present.procedures = true;
            procedure(reference, p, m, f);
        }
        Resource::Immunization(i) => {
            f.present.immunizations = true;
            if let Some(x) = immunization(reference, i, m) {
                f.immunizations.push(x);
            }
        }
        Resource::AllergyIntolerance(a) => {
            f.present.allergies = true;
            if let Some(x) = allergy(reference, a, m) {
                f.allergies.push(x);
            }
        }
        Resource::DiagnosticReport(d) => {
            f.present.reports = true;
            diagnostic_report(reference, d, m, f);
        }
        Resource::Patient(_) | Resource::Medication(_) => {}
    }
}

/// The Patient fields [`demographics`] reads: of a parsed Patient, or borrowed from a
/// scanned line (`fast::PatientLine`), so that both ways share one rule.
pub trait PatientFields {
    type Name: super::person::NameFields;
    type Id: super::person::IdFields;
    fn birth_date(&self) -> Option<&str>;
    fn gender(&self) -> Option<&str>;
    fn active(&self) -> Option<bool>;
    fn deceased_boolean(&self) -> Option<bool>;
    fn deceased_date_time(&self) -> Option<&str>;
    /// Who a `replaced-by` link names ("another record" when it names no one).
    fn replaced_by(&self) -> Option<String>;
    fn names(&self) -> &[Self::Name];
    fn identifiers(&self) -> &[Self::Id];
}

impl PatientFields for Patient {
    type Name = HumanName;
    type Id = Identifier;
    fn birth_date(&self) -> Option<&str> {
        self.birth_date.as_deref()
    }
    fn gender(&self) -> Option<&str> {
        self.gender.as_deref()
    }
    fn active(&self) -> Option<bool> {
        self.active
    }
    fn deceased_boolean(&self) -> Option<bool> {
        self.deceased_boolean
    }
    fn deceased_date_time(&self) -> Option<&str> {
        self.deceased_date_time.as_deref()
    }
    fn replaced_by(&self) -> Option<String> {
        self.link.iter().find(|l| l.kind.as_deref() == Some("replaced-by")).map(|l| {
            l.other
                .as_ref()
                .and_then(|o| o.reference.clone())
                .unwrap_or_else(|| "another record".into())
        })
    }
    fn names(&self) -> &[HumanName] {
        self.name.0.as_deref().unwrap_or_default()
    }
    fn identifiers(&self) -> &[Identifier] {
        self.identifier.0.as_deref().unwrap_or_default()
    }
}

pub fn demographics(p: &impl PatientFields) -> Demographics {
    let deceased = match (p.deceased_boolean(), p.deceased_date_time()) {
        (_, Some(t)) => Some(Deceased {
            when: parse_fhir_instant(t),
            text: format!("deceased ({t})"),
        }),
        (Some(true), None) => Some(Deceased {
            when: None,
            text: "deceased".to_string(),
        }),
        _ => None,
    };
    Demographics {
        birth_date: p.birth_date().and_then(Date::parse),
        birth_text: p.birth_date().map(str::to_string),
        gender: p.gender().map(str::to_string),
        deceased,
        inactive: p.active() == Some(false),
        replaced_by: p.replaced_by(),
        person: super::person::person(p.names(), p.identifiers()),
    }
}

fn codes_of(cc: Option<&CodeableConcept>, m: &Mappings) -> Vec<SystemCode> {
    codings_of(cc, m)
        .into_iter()
        .map(|(system, code)| SystemCode {
            system: system.to_string(),
            code: code.to_string(),
        })
        .collect()
}

/// The (system key, trimmed code) of each coding that has a code, borrowed.
fn codings_of<'a, C: Concept>(cc: Option<&'a C>, m: &'a Mappings) -> Vec<(&'a str, &'a str)> {
    cc.map(|cc| {
        cc.codings()
            .filter_map(|(system, code)| Some((m.system_key_str(system), crate::fhir::trim(code?))))
            .collect()
    })
    .unwrap_or_default()
}

/// How a record's first code is shown: `system|code`.
fn label(first: Option<(&str, &str)>) -> String {
    first
        .map(|(system, code)| [system, "|", code].concat())
        .unwrap_or_else(|| "(no code)".into())
}

/// The first of `codes`, for [`label`].
fn first(codes: &[SystemCode]) -> Option<(&str, &str)> {
    codes.first().map(|c| (c.system.as_str(), c.code.as_str()))
}

fn sets_for(codes: &[SystemCode], m: &Mappings) -> Vec<usize> {
    let mut out = Vec::new();
    for c in codes {
        m.sets_of(c, &mut out);
    }
    out
}

fn time_of(date_time: Option<&String>, period: Option<&Period>) -> Option<Option<crate::time::Instant>> {
    // Outer None: no time element at all. Inner None: present but unusable.
    if let Some(t) = date_time {
        return Some(parse_fhir_instant(t));
    }
    period.and_then(|p| p.start.as_ref()).map(|s| parse_fhir_instant(s))
}

const UCUM: &str = "http://unitsofmeasure.org";

/// The unit a quantity is in: its `code` when that is a UCUM code (system UCUM or absent),
/// else its human-readable `unit` (a code from another system, such as SNOMED, is not a unit).
pub(crate) fn unit_key(q: &Quantity) -> Option<&str> {
    QuantityFields::of(q).unit_key()
}

/// The fields of a Quantity that reductions read, borrowed: from a parsed Quantity, or from
/// an NDJSON line (`fast::ObsLine`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct QuantityFields<'a> {
    pub value: Option<f64>,
    pub comparator: Option<&'a str>,
    pub unit: Option<&'a str>,
    pub system: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl<'a> QuantityFields<'a> {
    pub fn of(q: &'a Quantity) -> QuantityFields<'a> {
        QuantityFields {
            value: q.value,
            comparator: q.comparator.as_deref(),
            unit: q.unit.as_deref(),
            system: q.system.as_deref(),
            code: q.code.as_deref(),
        }
    }

    /// See [`unit_key`].
    pub fn unit_key(&self) -> Option<&'a str> {
        let code = self.code.filter(|_| self.system.is_none_or(|s| crate::fhir::trim(s) == UCUM));
        code.or(self.unit).map(crate::fhir::trim)
    }
}

/// `<0.1`, `> 60`, `≥1.5`, `60`: a bound or an exact number.
pub fn parse_bounded_text(s: &str) -> Option<Bounded> {
    let s = s.trim();
    let (bound, rest) = if let Some(r) = s.strip_prefix("<=").or_else(|| s.strip_prefix('≤')).or_else(|| s.strip_prefix('<')) {
        (Some(Bound::AtMost), r)
    } else if let Some(r) = s.strip_prefix(">=").or_else(|| s.strip_prefix('≥')).or_else(|| s.strip_prefix('>')) {
        (Some(Bound::AtLeast), r)
    } else {
        (None, s)
    };
    let value: f64 = rest.trim().parse().ok()?;
    value.is_finite().then_some(Bounded { value, bound })
}

/// `>60 mL/min/1.73m2`: a bound or number followed by an optional unit.
fn parse_bounded_with_unit(s: &str) -> Option<(Bounded, Option<&str>)> {
    if let Some(b) = parse_bounded_text(s) {
        return Some((b, None));
    }
    let s = s.trim();
    let split = s.find(char::is_whitespace)?;
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    // `< 0.2 mg/mg`: the comparator may stand apart from the number.
    if let Some(b) = parse_bounded_text(num).filter(|_| !unit.is_empty()) {
        return Some((b, Some(unit)));
    }
    let (num2, unit2) = unit.split_at(unit.find(char::is_whitespace)?);
    let b = parse_bounded_text(&format!("{num}{num2}"))?;
    Some((b, Some(unit2.trim()).filter(|u| !u.is_empty())))
}

fn comparator(c: Option<&str>) -> Result<Option<Bound>, String> {
    match c.map(str::trim) {
        None | Some("") => Ok(None),
        Some("<" | "<=") => Ok(Some(Bound::AtMost)),
        Some(">" | ">=") => Ok(Some(Bound::AtLeast)),
        Some(other) => Err(other.to_string()),
    }
}

/// An Observation's (or a component's) value and reference ranges, borrowed.
pub(crate) struct ValueParts<'a> {
    pub quantity: Option<QuantityFields<'a>>,
    pub string: Option<&'a str>,
    pub integer: Option<i64>,
    pub concept: Option<&'a CodeableConcept>,
    pub ranges: &'a [ReferenceRange],
}

/// The fields of an Observation its reduction reads, borrowed: from a parsed Observation, or
/// built from an NDJSON line (`fast::ObsLine`), so that both ways share one rule.
pub(crate) struct ObservationFields<'a, C: Concept> {
    pub id: Option<&'a str>,
    pub status: Option<&'a str>,
    pub effective_date_time: Option<&'a str>,
    /// `Some(start)` when effectivePeriod is there.
    pub effective_period: Option<Option<&'a str>>,
    pub effective_instant: Option<&'a str>,
    pub code: Option<&'a C>,
    pub value: ValueParts<'a>,
    pub components: &'a [Component],
}

impl<'a> ObservationFields<'a, CodeableConcept> {
    fn of(o: &'a Observation) -> Self {
        ObservationFields {
            id: o.id.as_deref(),
            status: o.status.as_deref(),
            effective_date_time: o.effective_date_time.as_deref(),
            effective_period: o.effective_period.as_ref().map(|p| p.start.as_deref()),
            effective_instant: o.effective_instant.as_deref(),
            code: o.code.as_ref(),
            value: ValueParts {
                quantity: o.value_quantity.as_ref().map(QuantityFields::of),
                string: o.value_string.as_deref(),
                integer: o.value_integer,
                concept: o.value_codeable_concept.as_ref(),
                ranges: &o.reference_range,
            },
            components: &o.component,
        }
    }
}

/// The instant an Observation is placed at: its effectiveDateTime, else its
/// effectivePeriod's start (`period` is `Some(start)` when the period is there), else its
/// effectiveInstant. None when it has none or the one it has is unusable: the Observation
/// then gives nothing.
pub(crate) fn observation_time(date_time: Option<&str>, period: Option<Option<&str>>, instant: Option<&str>) -> Option<Instant> {
    match (date_time, period.flatten()) {
        (Some(t), _) | (None, Some(t)) => parse_fhir_instant(t),
        (None, None) => instant.and_then(parse_fhir_instant),
    }
}

/// Whether a rule looks at `lab` at `time` (every lab, every time, without `spans`).
pub(crate) fn wanted(spans: Option<&[Option<crate::time::Window>]>, lab: usize, time: Instant) -> bool {
    spans.is_none_or(|sp| sp.get(lab).copied().flatten().is_some_and(|w| w.contains(time)))
}

/// An Observation's lab values, from its fields: those of a parsed Observation
/// ([`ObservationFields::of`]) or of a scanned line (`fast::build`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn observation<C: Concept>(
    reference: &str,
    o: &ObservationFields<'_, C>,
    raw: Option<&serde_json::value::RawValue>,
    demo: &Basics,
    m: &Mappings,
    spans: Option<&[Option<crate::time::Window>]>,
    unmapped: &mut Unmapped,
    labs: &mut super::Labs,
) {
    if !o.status.is_some_and(|s| OBS_VALID.contains(&s)) {
        return;
    }
    let Some(time) = observation_time(o.effective_date_time, o.effective_period, o.effective_instant) else {
        return;
    };
    let tie = o.id.unwrap_or_default();
    let wanted = |lab: usize| wanted(spans, lab, time);
    let codes = codings_of(o.code, m);
    let top = codes.iter().find_map(|&c| m.lab_for_str(c.0, c.1).map(|l| (l, c)));
    let mut matched = false;
    if let Some((lab, code)) = top.filter(|(lab, _)| {
        matched = true;
        wanted(*lab)
    }) {
        let json_value = m.labs[lab].value_path.as_ref().and_then(|p| path_number(p, raw));
        if let Some(v) = lab_value(reference, tie, time, lab, code, &o.value, json_value, demo, m, unmapped) {
            labs.entry(lab).or_default().push(v);
        }
    }
    for comp in o.components {
        let ccodes = codings_of(comp.code.as_ref(), m);
        let Some((lab, code)) = ccodes.iter().find_map(|&c| m.lab_for_str(c.0, c.1).map(|l| (l, c))) else {
            continue;
        };
        matched = true;
        if !wanted(lab) {
            continue;
        }
        let parts = ValueParts {
            quantity: comp.value_quantity.as_ref().map(QuantityFields::of),
            string: comp.value_string.as_deref(),
            integer: comp.value_integer,
            concept: comp.value_codeable_concept.as_ref(),
            ranges: &comp.reference_range,
        };
        if let Some(v) = lab_value(reference, tie, time, lab, code, &parts, None, demo, m, unmapped) {
            labs.entry(lab).or_default().push(v);
        }
    }
    if !matched {
        let unit = o.value.quantity.and_then(|q| q.unit_key()).unwrap_or("");
        if let Some((system, code)) = codes.first() {
            unmapped.add(system, code, unit);
        }
    }
}

fn path_number(path: &jsonpath_rust::parser::model::JpQuery, raw: Option<&serde_json::value::RawValue>) -> Option<f64> {
    let value: serde_json::Value = serde_json::from_str(raw?.get()).ok()?;
    let hits = jsonpath_rust::query::js_path_process(path, &value).ok()?;
    hits.into_iter().find_map(|h| h.val().as_f64())
}

#[allow(clippy::too_many_arguments)]
fn lab_value(
    reference: &str,
    tie: &str,
    time: crate::time::Instant,
    lab: usize,
    (system, code): (&str, &str),
    parts: &ValueParts,
    json_value: Option<f64>,
    demo: &Basics,
    m: &Mappings,
    unmapped: &mut Unmapped,
) -> Option<LabValue> {
    let spec = &m.labs[lab].spec;
    let dimensionless = spec.unit.starts_with('{') || spec.unit == "1";
    let mut v = LabValue {
        resource: reference.to_string(),
        tie: tie.to_string(),
        time,
        code: [system, "|", code].concat(),
        equation: m.labs[lab].equation_of.get(code).cloned(),
        raw_value: None,
        raw_text: None,
        raw_unit: None,
        reading: Reading::Result(String::new()),
        uln: None,
    };
    if let Some(x) = json_value {
        v.raw_value = Some(x);
        v.reading = Reading::Number(Bounded { value: x, bound: None });
    } else if let Some(q) = parts.quantity {
        let value = q.value?;
        v.raw_value = Some(value);
        v.raw_unit = q.unit_key().map(str::to_string);
        let unit = v.raw_unit.clone().unwrap_or_default();
        v.reading = match (comparator(q.comparator), m.lab_factor(lab, &unit)) {
            (Err(c), _) => Reading::BadComparator(c),
            (Ok(bound), Some(f)) => Reading::Number(Bounded {
                value: f.apply(value),
                bound,
            }),
            (Ok(_), None) if unit.is_empty() && dimensionless => Reading::Number(Bounded { value, bound: None }),
            (Ok(_), None) => {
                unmapped.add(system, code, &unit);
                Reading::Unconvertible {
                    raw_unit: if unit.is_empty() { "(no unit)".into() } else { unit },
                }
            }
        };
    } else if let Some(i) = parts.integer {
        v.raw_value = Some(i as f64);
        v.reading = if dimensionless {
            Reading::Number(Bounded {
                value: i as f64,
                bound: None,
            })
        } else {
            Reading::Unconvertible {
                raw_unit: "(no unit)".into(),
            }
        };
    } else if let Some(s) = parts.string {
        v.raw_text = Some(s.to_string());
        if let Some(r) = result_of_text(spec, s) {
            v.reading = Reading::Result(r);
        } else {
            let (b, unit) = parse_bounded_with_unit(s)?;
            match unit {
                // A bare bound such as `>60` (how labs report an eGFR or a UPCR off the scale)
                // is read in the canonical unit; a bare number is not, since it could be in
                // any unit (creatinine `88` is umol/L, not mg/dL).
                None if b.bound.is_some() || dimensionless => v.reading = Reading::Number(b),
                None => {
                    unmapped.add(system, code, "(no unit)");
                    v.reading = Reading::Unconvertible {
                        raw_unit: "(no unit)".into(),
                    };
                }
                Some(u) => {
                    v.raw_unit = Some(u.to_string());
                    v.reading = match m.lab_factor(lab, u) {
                        Some(f) => Reading::Number(Bounded {
                            value: f.apply(b.value),
                            bound: b.bound,
                        }),
                        None => {
                            unmapped.add(system, code, u);
                            Reading::Unconvertible { raw_unit: u.to_string() }
                        }
                    };
                }
            }
        }
    } else if let Some(cc) = parts.concept {
        let r = cc
            .coding
            .iter()
            .find_map(|c| c.code.as_deref().and_then(|k| result_of_text(spec, k)))
            .or_else(|| cc.text.as_deref().and_then(|t| result_of_text(spec, t)))?;
        v.raw_text = Some(r.clone());
        v.reading = Reading::Result(r);
    } else {
        return None;
    }
    v.uln = uln_of(parts.ranges, lab, v.raw_unit.as_deref(), demo, time, m);
    Some(v)
}

fn result_of_text(spec: &mappings::LabSpec, s: &str) -> Option<String> {
    let s = s.trim();
    spec.results
        .iter()
        .find(|(_, vals)| vals.iter().any(|v| v.eq_ignore_ascii_case(s)))
        .map(|(k, _)| k.clone())
}

/// ULN from referenceRange: entries of type normal (or untyped) that apply to the patient's
/// sex and age; the first with a `high` in a convertible unit wins (codes.md section 5).
fn uln_of(
    ranges: &[ReferenceRange],
    lab: usize,
    value_unit: Option<&str>,
    demo: &Basics,
    time: crate::time::Instant,
    m: &Mappings,
) -> Option<f64> {
    for r in ranges {
        if let Some(t) = &r.kind {
            if !t.coding.is_empty() && !t.has_code(&["normal"]) {
                continue;
            }
        }
        if !r.applies_to.is_empty() {
            let sex = demo.gender.as_deref().unwrap_or("");
            let mentions_sex = r
                .applies_to
                .iter()
                .any(|a| a.has_code(&["male", "female", "248153007", "248152002"]));
            let matches_sex = r.applies_to.iter().any(|a| match sex {
                "male" => a.has_code(&["male", "248153007"]),
                "female" => a.has_code(&["female", "248152002"]),
                _ => false,
            });
            if mentions_sex && !matches_sex {
                continue;
            }
        }
        if let (Some(age), Some(birth)) = (&r.age, demo.birth_date) {
            let years = time.date().years_since(birth) as f64;
            if age.low.as_ref().and_then(|q| q.value).is_some_and(|lo| years < lo)
                || age.high.as_ref().and_then(|q| q.value).is_some_and(|hi| years > hi)
            {
                continue;
            }
        }
        let Some(high) = &r.high else { continue };
        let Some(value) = high.value else { continue };
        // A unitless `high` is in the unit of the value it bounds.
        let unit = unit_key(high).or(value_unit).unwrap_or("");
        let factor = if unit.is_empty() {
            Some(mappings::Factor::Multiply(1.0))
        } else {
            m.lab_factor(lab, unit)
        };
        if let Some(f) = factor {
            return Some(f.apply(value));
        }
    }
    None
}

const CLINICAL: &[&str] = &["active", "recurrence", "relapse", "inactive", "remission", "resolved"];

pub(crate) fn condition(reference: &str, c: &Condition, m: &Mappings, unmapped: &mut Unmapped) -> Option<ConditionFact> {
    fn period(p: &Option<Period>) -> Option<(Option<&str>, Option<&str>)> {
        p.as_ref().map(|p| (p.start.as_deref(), p.end.as_deref()))
    }
    let fields = ConditionFields {
        clinical: c.clinical_status.as_ref(),
        verification: c.verification_status.as_ref(),
        code: c.code.as_ref(),
        onset_date_time: c.onset_date_time.as_deref(),
        onset_period: period(&c.onset_period),
        abatement_date_time: c.abatement_date_time.as_deref(),
        abatement_period: period(&c.abatement_period),
        abatement_boolean: c.abatement_boolean,
        recorded_date: c.recorded_date.as_deref(),
    };
    condition_of(&fields, || reference.to_string(), m, |s, c, out| m.sets_of_str(s, c, out), unmapped)
}

/// A CodeableConcept, as the reduction of a Condition reads it.
pub(crate) trait Concept {
    /// Each coding's (system, code).
    fn codings(&self) -> impl Iterator<Item = (Option<&str>, Option<&str>)>;
    fn text(&self) -> Option<&str>;
}

impl Concept for CodeableConcept {
    fn codings(&self) -> impl Iterator<Item = (Option<&str>, Option<&str>)> {
        self.coding.iter().map(|c| (c.system.as_deref(), c.code.as_deref()))
    }

    fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// The fields of a Condition its reduction reads, borrowed: from a parsed Condition, or
/// straight from an NDJSON line (`fast::ConditionLine`), so that both ways share one rule.
pub(crate) struct ConditionFields<'a, C: Concept> {
    pub clinical: Option<&'a C>,
    pub verification: Option<&'a C>,
    pub code: Option<&'a C>,
    pub onset_date_time: Option<&'a str>,
    /// (start, end)
    pub onset_period: Option<(Option<&'a str>, Option<&'a str>)>,
    pub abatement_date_time: Option<&'a str>,
    pub abatement_period: Option<(Option<&'a str>, Option<&'a str>)>,
    pub abatement_boolean: Option<bool>,
    pub recorded_date: Option<&'a str>,
}

/// A Condition's fact, or None when it is no usable diagnosis (entered in error, refuted,
/// or of no mapped code: those with a code of an unknown system are counted as unmapped).
/// `reference` names the Condition; it is made only for a fact.
pub(crate) fn condition_of<C: Concept>(
    c: &ConditionFields<'_, C>,
    reference: impl FnOnce() -> String,
    m: &Mappings,
    mut sets_of: impl FnMut(&str, &str, &mut Vec<usize>),
    unmapped: &mut Unmapped,
) -> Option<ConditionFact> {
    if c.verification.is_some_and(|v| {
        v.codings()
            .any(|(_, code)| code.is_some_and(|k| ["entered-in-error", "refuted"].contains(&k)))
    }) {
        return None;
    }
    let codes = codings_of(c.code, m);
    let mut sets = Vec::new();
    for (system, code) in &codes {
        sets_of(system, code, &mut sets);
    }
    if sets.is_empty() {
        for (system, code) in codes.iter().filter(|(system, _)| !m.known_system(system)) {
            unmapped.add(system, code, "");
        }
        return None;
    }
    // Some feeds send the status as text only ({"text": "Active"}): read that too.
    let clinical = c.clinical.map(|cs| {
        cs.codings()
            .filter_map(|(_, code)| code)
            .chain(cs.text())
            .find_map(|k| CLINICAL.iter().find(|c| crate::fhir::trim(k).eq_ignore_ascii_case(c)))
            .map_or("unrecognised", |c| c)
            .to_string()
    });
    let period_range = |p: Option<&str>| p.and_then(parse_fhir_range);
    let onset = match (c.onset_date_time, c.onset_period) {
        (Some(t), _) => parse_fhir_range(t),
        (None, Some((start, _))) => period_range(start),
        (None, None) => None,
    };
    let abatement = match (c.abatement_date_time, c.abatement_period) {
        (Some(t), _) => parse_fhir_range(t),
        (None, Some((start, end))) => period_range(end.or(start)),
        (None, None) => None,
    };
    Some(ConditionFact {
        resource: reference(),
        sets,
        code: label(codes.first().copied()),
        clinical,
        onset,
        abatement,
        // Over, date unknown; an unusable abatement date is ignored like any unusable time.
        abated_undated: abatement.is_none() && c.abatement_boolean == Some(true),
        recorded: c.recorded_date.and_then(parse_fhir_instant),
    })
}

/// The codes naming a medication: its CodeableConcept or the referenced Medication's code and
/// ingredients; RxNorm products are rolled up to their ingredients. Returns (sets, routes, label).
fn medication_sets(
    cc: Option<&CodeableConcept>,
    reference: Option<&Reference>,
    contained: &[Medication],
    meds: &MedicationIndex,
    m: &Mappings,
    unmapped: &mut Unmapped,
) -> (Vec<usize>, Vec<usize>, String) {
    let mut codes = codes_of(cc, m);
    if let Some(r) = reference.and_then(|r| r.reference.as_deref()) {
        let med = match r.strip_prefix('#') {
            Some(id) => contained.iter().find(|c| c.id.as_deref() == Some(id)),
            None => meds.get(r),
        };
        if let Some(med) = med {
            codes.extend(codes_of(med.code.as_ref(), m));
            for ing in &med.ingredient {
                codes.extend(codes_of(ing.item_codeable_concept.as_ref(), m));
            }
        }
    }
    let mut sets = sets_for(&codes, m);
    let mut routes = Vec::new();
    for c in codes.iter().filter(|c| c.system == "rxnorm") {
        if let Some(p) = m.product(&c.code) {
            for ing in &p.ingredients {
                m.sets_of(
                    &SystemCode {
                        system: "rxnorm".into(),
                        code: ing.clone(),
                    },
                    &mut sets,
                );
            }
            if let Some(route) = p.route.as_deref().and_then(|r| m.set(r)) {
                routes.push(route);
            }
        }
    }
    if sets.is_empty() {
        if let Some(c) = codes.first() {
            unmapped.add(&c.system, &c.code, "");
        }
    }
    (sets, routes, label(first(&codes)))
}

fn route_sets(route: Option<&CodeableConcept>, m: &Mappings, out: &mut Vec<usize>) {
    let Some(cc) = route else { return };
    let mut found = sets_for(&codes_of(Some(cc), m), m);
    if found.is_empty() {
        for t in cc.text.iter().chain(cc.coding.iter().filter_map(|c| c.display.as_ref())) {
            m.sets_of_text(t, &mut found);
        }
    }
    for s in found {
        if !out.contains(&s) {
            out.push(s);
        }
    }
}

fn period_bounds(p: Option<&Period>) -> (Option<Instant>, Option<Instant>) {
    match p {
        Some(p) => (
            p.start.as_deref().and_then(parse_fhir_instant),
            p.end.as_deref().and_then(parse_fhir_instant),
        ),
        None => (None, None),
    }
}

/// What the three medication resources have in common once their own status and timing
/// rules are applied.
struct Exposure<'a> {
    source: MedSource,
    concept: Option<&'a CodeableConcept>,
    reference: Option<&'a Reference>,
    contained: &'a [Medication],
    dosage_routes: Vec<Option<&'a CodeableConcept>>,
    start: Option<Instant>,
    end: Option<Instant>,
    ongoing: bool,
    finished: bool,
    dose: Option<&'a Quantity>,
}

fn exposure(reference: &str, e: Exposure, meds: &MedicationIndex, m: &Mappings, unmapped: &mut Unmapped) -> Option<MedicationFact> {
    let (sets, mut routes, code) = medication_sets(e.concept, e.reference, e.contained, meds, m, unmapped);
    if sets.is_empty() {
        return None;
    }
    // A route stated on the dosage wins over the one the product's dose form implies.
    let mut dose_routes = Vec::new();
    for r in e.dosage_routes {
        route_sets(r, m, &mut dose_routes);
    }
    if !dose_routes.is_empty() {
        routes = dose_routes;
    }
    let dose_g = e.dose.and_then(|q| Some(m.dose_factor(unit_key(q)?)?.apply(q.value?)));
    let dose_text = e.dose.map(|q| {
        format!(
            "{} {}",
            q.value.map(|v| v.to_string()).unwrap_or_default(),
            unit_key(q).unwrap_or("")
        )
    });
    Some(MedicationFact {
        resource: reference.to_string(),
        source: e.source,
        sets,
        code,
        start: e.start,
        end: e.end,
        ongoing: e.ongoing,
        finished: e.finished,
        routes,
        dose_g,
        dose_text,
    })
}

fn medication_request(
    reference: &str,
    r: &MedicationRequest,
    meds: &MedicationIndex,
    m: &Mappings,
    unmapped: &mut Unmapped,
) -> Option<MedicationFact> {
    let status = r.status.as_deref()?;
    if !["active", "completed", "stopped", "on-hold"].contains(&status) {
        return None;
    }
    if matches!(r.intent.as_deref(), Some("plan" | "proposal" | "option")) || r.do_not_perform == Some(true) {
        return None;
    }
    let bounds = r
        .dosage_instruction
        .iter()
        .find_map(|d| d.timing.as_ref()?.repeat.as_ref()?.bounds_period.as_ref());
    let validity = r.dispense_request.as_ref().and_then(|d| d.validity_period.as_ref());
    let (dose_start, dose_end) = period_bounds(bounds);
    let (valid_start, valid_end) = period_bounds(validity);
    let start = dose_start
        .or_else(|| r.authored_on.as_deref().and_then(parse_fhir_instant))
        .or(valid_start);
    let finished = matches!(status, "completed" | "stopped");
    // validityPeriod bounds dispensing, not taking: it closes an exposure only once the order
    // itself is over; an active order whose prescription window lapsed is still being taken.
    // A finished order with no dates of its own lasted its expected supply (each fill).
    let supplied = r.dispense_request.as_ref().and_then(|d| {
        let days = duration_days(d.expected_supply_duration.as_ref()?)?;
        let fills = f64::from(d.number_of_repeats_allowed.unwrap_or(0).min(365) + 1);
        Some(Instant(start?.0 + (days * fills * 86_400.0) as i64))
    });
    let end = dose_end.or(if finished { valid_end.or(supplied) } else { None });
    let e = Exposure {
        source: MedSource::Request,
        concept: r.medication_codeable_concept.as_ref(),
        reference: r.medication_reference.as_ref(),
        contained: &r.contained,
        dosage_routes: r.dosage_instruction.iter().map(|d| d.route.as_ref()).collect(),
        start,
        end,
        ongoing: end.is_none() && !finished,
        finished,
        dose: None,
    };
    exposure(reference, e, meds, m, unmapped)
}

/// A FHIR Duration in days (`d`, `wk`, `mo` as 30 days, `a` as 365); None for other units.
fn duration_days(q: &Quantity) -> Option<f64> {
    let v = q.value.filter(|v| v.is_finite() && *v >= 0.0 && *v <= 36_500.0)?;
    let per_day = match unit_key(q)? {
        "d" | "day" | "days" => 1.0,
        "wk" | "week" | "weeks" => 7.0,
        "mo" | "month" | "months" => 30.0,
        "a" | "year" | "years" => 365.0,
        _ => return None,
    };
    Some(v * per_day)
}

fn medication_statement(
    reference: &str,
    r: &MedicationStatement,
    meds: &MedicationIndex,
    m: &Mappings,
    unmapped: &mut Unmapped,
) -> Option<MedicationFact> {
    let status = r.status.as_deref()?;
    if !["active", "completed", "stopped", "on-hold"].contains(&status) {
        return None;
    }
    let (start, end) = match (&r.effective_date_time, &r.effective_period) {
        (Some(t), _) => (parse_fhir_instant(t), None),
        (None, Some(p)) => period_bounds(Some(p)),
        (None, None) => (r.date_asserted.as_deref().and_then(parse_fhir_instant), None),
    };
    let e = Exposure {
        source: MedSource::Statement,
        concept: r.medication_codeable_concept.as_ref(),
        reference: r.medication_reference.as_ref(),
        contained: &r.contained,
        dosage_routes: r.dosage.iter().map(|d| d.route.as_ref()).collect(),
        start,
        end,
        ongoing: end.is_none() && matches!(status, "active" | "on-hold"),
        finished: matches!(status, "completed" | "stopped"),
        dose: None,
    };
    exposure(reference, e, meds, m, unmapped)
}

fn medication_administration(
    reference: &str,
    r: &MedicationAdministration,
    meds: &MedicationIndex,
    m: &Mappings,
    unmapped: &mut Unmapped,
) -> Option<MedicationFact> {
    let status = r.status.as_deref()?;
    if !["completed", "in-progress", "stopped"].contains(&status) {
        return None;
    }
    let (start, end) = match (&r.effective_date_time, &r.effective_period) {
        (Some(t), _) => (parse_fhir_instant(t), None),
        (None, p) => period_bounds(p.as_ref()),
    };
    let e = Exposure {
        source: MedSource::Administration,
        concept: r.medication_codeable_concept.as_ref(),
        reference: r.medication_reference.as_ref(),
        contained: &r.contained,
        dosage_routes: vec![r.dosage.as_ref().and_then(|d| d.route.as_ref())],
        start,
        end,
        ongoing: false,
        finished: false,
        dose: r.dosage.as_ref().and_then(|d| d.dose.as_ref()),
    };
    exposure(reference, e, meds, m, unmapped)
}

fn procedure(reference: &str, p: &Procedure, m: &Mappings, f: &mut PatientFacts) {
    if matches!(
        p.status.as_deref(),
        Some("not-done" | "entered-in-error" | "preparation" | "unknown") | None
    ) {
        return;
    }
    let codes = codes_of(p.code.as_ref(), m);
    let sets = sets_for(&codes, m);
    if sets.is_empty() {
        return;
    }
    let (start, end) = match (&p.performed_date_time, &p.performed_period) {
        (Some(t), _) => (parse_fhir_instant(t), None),
        (None, per) => period_bounds(per.as_ref()),
    };
    for (kind, b) in &m.biopsies {
        if m.set(&b.procedures).is_some_and(|s| sets.contains(&s)) {
            f.biopsies.push(BiopsyFact {
                kind: kind.clone(),
                resource: reference.to_string(),
                time: start,
                classes: Vec::new(),
            });
        }
    }
    f.procedures.push(EventFact {
        resource: reference.to_string(),
        sets,
        code: label(first(&codes)),
        time: start,
        end,
    });
}

fn immunization(reference: &str, i: &Immunization, m: &Mappings) -> Option<EventFact> {
    if i.status.as_deref() != Some("completed") {
        return None;
    }
    let codes = codes_of(i.vaccine_code.as_ref(), m);
    let sets = sets_for(&codes, m);
    if sets.is_empty() {
        return None;
    }
    Some(EventFact {
        resource: reference.to_string(),
        sets,
        code: label(first(&codes)),
        time: i.occurrence_date_time.as_deref().and_then(parse_fhir_instant),
        end: None,
    })
}

fn allergy(reference: &str, a: &AllergyIntolerance, m: &Mappings) -> Option<AllergyFact> {
    if a.verification_status
        .as_ref()
        .is_some_and(|v| v.has_code(&["entered-in-error", "refuted"]))
    {
        return None;
    }
    if a.clinical_status.as_ref().is_some_and(|c| c.has_code(&["inactive", "resolved"])) {
        return None;
    }
    let codes = codes_of(a.code.as_ref(), m);
    let mut sets = sets_for(&codes, m);
    for c in codes.iter().filter(|c| c.system == "rxnorm") {
        if let Some(p) = m.product(&c.code) {
            for ing in &p.ingredients {
                m.sets_of(
                    &SystemCode {
                        system: "rxnorm".into(),
                        code: ing.clone(),
                    },
                    &mut sets,
                );
            }
        }
    }
    if sets.is_empty() {
        return None;
    }
    Some(AllergyFact {
        resource: reference.to_string(),
        sets,
        code: label(first(&codes)),
    })
}

fn diagnostic_report(reference: &str, d: &DiagnosticReport, m: &Mappings, f: &mut PatientFacts) {
    if !d
        .status
        .as_deref()
        .is_some_and(|s| ["final", "amended", "corrected", "appended"].contains(&s))
    {
        return;
    }
    let sets = sets_for(&codes_of(d.code.as_ref(), m), m);
    let mut found = Vec::new();
    for cc in &d.conclusion_code {
        found.extend(sets_for(&codes_of(Some(cc), m), m));
    }
    for (kind, b) in &m.biopsies {
        let classes: Vec<String> = b
            .classes
            .iter()
            .filter(|(_, set)| m.set(set).is_some_and(|s| found.contains(&s)))
            .map(|(class, _)| class.clone())
            .collect();
        // Pathology reports are usually coded with a generic LOINC (a pathology panel), not
        // the biopsy: a conclusion coding a class of this kind identifies the report as well.
        let is_report = m.set(&b.reports).is_some_and(|s| sets.contains(&s));
        if !is_report && classes.is_empty() {
            continue;
        }
        let time = time_of(d.effective_date_time.as_ref(), d.effective_period.as_ref())
            .flatten()
            .or_else(|| d.issued.as_deref().and_then(parse_fhir_instant));
        f.biopsies.push(BiopsyFact {
            kind: kind.clone(),
            resource: reference.to_string(),
            time,
            classes,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_strings() {
        assert_eq!(
            parse_bounded_text(">60"),
            Some(Bounded {
                value: 60.0,
                bound: Some(Bound::AtLeast)
            })
        );
        assert_eq!(
            parse_bounded_text("< 0.1"),
            Some(Bounded {
                value: 0.1,
                bound: Some(Bound::AtMost)
            })
        );
        assert_eq!(
            parse_bounded_text("≥1.5"),
            Some(Bounded {
                value: 1.5,
                bound: Some(Bound::AtLeast)
            })
        );
        assert_eq!(parse_bounded_text("45"), Some(Bounded { value: 45.0, bound: None }));
        assert_eq!(parse_bounded_text("high"), None);
        let (b, u) = parse_bounded_with_unit(">60 mL/min/1.73m2").unwrap();
        assert_eq!((b.value, b.bound, u), (60.0, Some(Bound::AtLeast), Some("mL/min/1.73m2")));
        let (b, u) = parse_bounded_with_unit("< 0.2 mg/mg").unwrap();
        assert_eq!((b.value, b.bound, u), (0.2, Some(Bound::AtMost), Some("mg/mg")));
        assert!(parse_bounded_with_unit("see comment").is_none());
    }
}
