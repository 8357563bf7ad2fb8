//! A patient's facts as held while a cohort is read: encoded one after another into a few
//! hundred bytes, and decoded into a [`PatientFacts`] only when the patient is evaluated.
//!
//! A cohort's facts are all held at once between the end of the reading and the evaluation,
//! so what one patient costs there is what memory grows by per patient. As structs, a
//! patient with two lab values and a diagnosis is about 1.7 KB (a 400-byte `PatientFacts`
//! with a map of labs, 200-byte lab values each with four strings, the demographics twice);
//! encoded (postcard: variable-length integers, strings inline) it is about 350 bytes.
//! Encoding each fact once (on the worker that reduced it) and decoding it once (on the
//! worker that evaluates it) costs about what merging and trimming the structs on the main
//! thread did; with fewer pages to fault in, BENCH-LN got faster, not slower.

use super::*;

/// One patient's facts, encoded. Facts are appended in the order they are read, so the
/// lists decoded come out in the order a [`PatientFacts`] built directly would hold them.
#[derive(Debug, Default)]
pub struct Held {
    key: Box<str>,
    present: Present,
    /// Some fact could not be encoded: the patient is screened as if nothing were known
    /// (see [`Held::facts`]), never on the facts that were.
    broken: bool,
    bytes: Vec<u8>,
}

/// One fact, tagged with the list of [`PatientFacts`] it goes to.
#[derive(serde::Serialize, serde::Deserialize)]
enum Item {
    /// Demographics, with their `person` apart as (name, MRN): `Person` leaves its empty
    /// fields out when serialized (for the reports), which a format without field names
    /// could not read back.
    Demographics(Demographics, Option<(Option<String>, Option<String>)>),
    /// A lab value; true: its `resource` was `Observation/<tie>` and is left out (what every
    /// value read from NDJSON is: the id would otherwise be held twice).
    Lab(usize, bool, LabValue),
    Condition(ConditionFact),
    Medication(MedicationFact),
    Procedure(EventFact),
    Immunization(EventFact),
    Allergy(AllergyFact),
    Biopsy(BiopsyFact),
}

const OBSERVATION: &str = "Observation/";

/// A patient's held facts are not whole: a fact type and its encoding disagree (a bug, such
/// as a serde attribute the format cannot carry), never bad input.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("a patient's held facts cannot be decoded ({0}); this is a bug in trialgate")]
    Decode(postcard::Error),
    #[error("some of a patient's facts could not be encoded; this is a bug in trialgate")]
    Encode,
}

/// Appends `item`; false when it could not be encoded. Into a Vec, from plain structs of
/// strings, numbers and enums, postcard fails only on what these types do not have (maps of
/// unknown length), which the round-trip tests below would show. A failed item is cut off,
/// so that the ones after it still decode.
fn put(item: &Item, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    match postcard::to_io(item, &mut *out) {
        Ok(_) => true,
        Err(e) => {
            out.truncate(start);
            tracing::error!(error = %e, "a fact could not be encoded");
            false
        }
    }
}

/// Encodes the facts of `f` (not its key nor its demographics) onto `out`; returns which
/// kinds of record the patient has, which the encoding does not carry, or `None` when some
/// fact could not be encoded.
pub fn encode(f: PatientFacts, out: &mut Vec<u8>) -> Option<Present> {
    let PatientFacts {
        key: _,
        demographics: _,
        labs,
        conditions,
        medications,
        procedures,
        immunizations,
        allergies,
        biopsies,
        present,
    } = f;
    let mut whole = true;
    for (lab, values) in labs {
        for mut v in values {
            let named = v.resource.strip_prefix(OBSERVATION) == Some(v.tie.as_str());
            if named {
                v.resource = String::new();
            }
            whole &= put(&Item::Lab(lab, named, v), out);
        }
    }
    let items = (conditions.into_iter().map(Item::Condition))
        .chain(medications.into_iter().map(Item::Medication))
        .chain(procedures.into_iter().map(Item::Procedure))
        .chain(immunizations.into_iter().map(Item::Immunization))
        .chain(allergies.into_iter().map(Item::Allergy))
        .chain(biopsies.into_iter().map(Item::Biopsy));
    for item in items {
        whole &= put(&item, out);
    }
    whole.then_some(present)
}

impl Held {
    /// A patient with no facts yet.
    pub fn new(key: String, demographics: Demographics) -> Held {
        Held::with(key, Self::demographics(demographics))
    }

    /// Encodes demographics for [`Held::with`] (on the thread that read the Patient: the
    /// one that registers patients is the one that waits). `None`: they could not be.
    pub fn demographics(mut d: Demographics) -> Option<Vec<u8>> {
        let mut bytes = Vec::new();
        let person = d.person.take().map(|p| (p.name, p.mrn));
        put(&Item::Demographics(d, person), &mut bytes).then(|| {
            bytes.shrink_to_fit();
            bytes
        })
    }

    /// A patient with no facts yet, and demographics encoded by [`Held::demographics`].
    pub fn with(key: String, demographics: Option<Vec<u8>>) -> Held {
        Held {
            key: key.into_boxed_str(),
            present: Present::default(),
            broken: demographics.is_none(),
            bytes: demographics.unwrap_or_default(),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The size of the encoded demographics and facts, in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Adds facts encoded by [`encode`] (`present` is what it returned). Grown to the exact
    /// size: a patient gains a few facts at a time, and doubling would leave up to half of
    /// every patient's bytes unused.
    pub fn append(&mut self, present: Option<Present>, encoded: &[u8]) {
        match present {
            Some(p) => self.present.or(p),
            None => self.broken = true,
        }
        self.bytes.reserve_exact(encoded.len());
        self.bytes.extend_from_slice(encoded);
    }

    /// Adds facts (not their key nor demographics).
    pub fn add(&mut self, f: PatientFacts) {
        let mut bytes = Vec::new();
        let present = encode(f, &mut bytes);
        self.append(present, &bytes);
    }

    pub fn present_mut(&mut self) -> &mut Present {
        &mut self.present
    }

    /// The patient's facts, decoded, for evaluation. Should they not be whole (a bug), the
    /// patient is evaluated knowing nothing (every rule that reads a record says unknown,
    /// never a verdict taken from part of the record) and the error is logged.
    pub fn facts(&self) -> PatientFacts {
        self.try_facts().unwrap_or_else(|e| {
            tracing::error!("{e}; the patient is screened as if no record were known");
            PatientFacts {
                key: String::from(&*self.key),
                ..Default::default()
            }
        })
    }

    /// The patient's facts, decoded.
    pub fn try_facts(&self) -> Result<PatientFacts, HeldError> {
        if self.broken {
            return Err(HeldError::Encode);
        }
        let mut f = PatientFacts {
            key: String::from(&*self.key),
            present: self.present,
            ..Default::default()
        };
        let mut rest = self.bytes.as_slice();
        while !rest.is_empty() {
            let (item, more) = postcard::take_from_bytes::<Item>(rest).map_err(HeldError::Decode)?;
            rest = more;
            match item {
                Item::Demographics(d, person) => {
                    f.demographics = d;
                    f.demographics.person = person.map(|(name, mrn)| Person { name, mrn });
                }
                Item::Lab(lab, named, mut v) => {
                    if named {
                        v.resource = [OBSERVATION, &v.tie].concat();
                    }
                    f.labs.entry(lab).or_default().push(v)
                }
                Item::Condition(x) => f.conditions.push(x),
                Item::Medication(x) => f.medications.push(x),
                Item::Procedure(x) => f.procedures.push(x),
                Item::Immunization(x) => f.immunizations.push(x),
                Item::Allergy(x) => f.allergies.push(x),
                Item::Biopsy(x) => f.biopsies.push(x),
            }
        }
        Ok(f)
    }
}

impl From<PatientFacts> for Held {
    fn from(mut f: PatientFacts) -> Held {
        let mut held = Held::new(std::mem::take(&mut f.key), std::mem::take(&mut f.demographics));
        held.add(f);
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{Date, Instant};

    /// Every kind of fact, with most optional fields filled (see [`bare`] for the others).
    fn sample() -> PatientFacts {
        let t = |s: i64| Instant(s);
        let lab = |id: &str, reading: Reading| LabValue {
            resource: format!("Observation/{id}"),
            tie: id.to_string(),
            time: t(1_700_000_000),
            code: "2889-4".into(),
            equation: Some("ckd-epi-2021".into()),
            raw_value: Some(1.5),
            raw_text: None,
            raw_unit: Some("mg/dL".into()),
            reading,
            uln: Some(40.0),
        };
        let mut labs = Labs::default();
        labs.insert(
            3,
            vec![
                lab(
                    "a",
                    Reading::Number(Bounded {
                        value: 0.5,
                        bound: Some(Bound::AtMost),
                    }),
                ),
                lab("b", Reading::Unconvertible { raw_unit: "mmol".into() }),
            ],
        );
        // Named by a Bundle's fullUrl, and by another resource's id: kept as they are.
        let mut c = lab("c", Reading::Result("positive".into()));
        c.resource = "urn:uuid:c".into();
        let mut d = lab("d", Reading::BadComparator("ad".into()));
        d.resource = "Observation/e".into();
        labs.insert(0, vec![c, d]);
        PatientFacts {
            key: "Patient/p1".into(),
            demographics: Demographics {
                birth_date: Date::parse("1980-02-29"),
                birth_text: Some("1980-02-29".into()),
                gender: Some("female".into()),
                deceased: Some(Deceased {
                    when: None,
                    text: "true".into(),
                }),
                inactive: true,
                replaced_by: None,
                person: Some(Person {
                    name: Some("Zoë Ann".into()),
                    mrn: None,
                }),
            },
            labs,
            conditions: vec![ConditionFact {
                resource: "Condition/c".into(),
                sets: vec![1, 7],
                code: "M32.14".into(),
                clinical: Some("active".into()),
                onset: Some((t(-86_400), t(0))),
                abatement: None,
                abated_undated: true,
                recorded: Some(t(5)),
            }],
            medications: vec![MedicationFact {
                resource: "MedicationRequest/m".into(),
                source: MedSource::Administration,
                sets: vec![2],
                code: "1234".into(),
                start: Some(t(10)),
                end: None,
                ongoing: true,
                finished: false,
                routes: vec![0],
                dose_g: Some(0.5),
                dose_text: Some("500 mg".into()),
            }],
            procedures: vec![EventFact {
                resource: "Procedure/p".into(),
                sets: vec![4],
                code: "39337004".into(),
                time: Some(t(20)),
                end: Some(t(30)),
            }],
            immunizations: vec![EventFact {
                resource: "Immunization/i".into(),
                sets: vec![],
                code: "08".into(),
                time: None,
                end: None,
            }],
            allergies: vec![AllergyFact {
                resource: "AllergyIntolerance/a".into(),
                sets: vec![5],
                code: "7980".into(),
            }],
            biopsies: vec![BiopsyFact {
                kind: "kidney".into(),
                resource: "Procedure/b".into(),
                time: Some(t(40)),
                classes: vec!["III".into(), "V".into()],
            }],
            present: Present {
                observations: true,
                conditions: true,
                medications: false,
                procedures: true,
                immunizations: false,
                allergies: true,
                reports: true,
            },
        }
    }

    /// As JSON, with the labs in a fixed order: what the rules and the fact state see.
    fn text(f: &PatientFacts) -> String {
        let mut v = serde_json::to_value(f).expect("facts serialize");
        if let Some(labs) = v.get_mut("labs").and_then(|l| l.as_object_mut()) {
            labs.sort_keys();
        }
        v.to_string()
    }

    #[test]
    fn facts_come_back_as_they_went_in() {
        let f = sample();
        let held = Held::from(f.clone());
        assert_eq!(held.key(), "Patient/p1");
        assert_eq!(text(&held.facts()), text(&f));
        // No person at all, and a person with neither field, are told apart.
        for person in [None, Some(Person::default())] {
            let mut g = PatientFacts::default();
            g.demographics.person = person.clone();
            assert_eq!(Held::from(g).facts().demographics.person, person);
        }
    }

    /// The sample with every optional field empty and every list empty: a field the encoding
    /// leaves out when empty (`skip_serializing_if`) would not decode back.
    fn bare() -> PatientFacts {
        let mut f = sample();
        f.demographics = Demographics::default();
        for values in f.labs.values_mut() {
            for v in values {
                (v.equation, v.raw_value, v.raw_text, v.raw_unit, v.uln) = (None, None, None, None, None);
                v.reading = Reading::Number(Bounded { value: 1.0, bound: None });
            }
        }
        for c in &mut f.conditions {
            (c.sets, c.clinical, c.onset, c.abatement, c.recorded) = (vec![], None, None, None, None);
        }
        for x in &mut f.medications {
            (x.sets, x.start, x.end, x.routes, x.dose_g, x.dose_text) = (vec![], None, None, vec![], None, None);
        }
        for x in f.procedures.iter_mut().chain(&mut f.immunizations) {
            (x.sets, x.time, x.end) = (vec![], None, None);
        }
        for x in &mut f.biopsies {
            (x.time, x.classes) = (None, vec![]);
        }
        f
    }

    #[test]
    fn empty_fields_come_back_empty() {
        let f = bare();
        assert_eq!(text(&Held::from(f.clone()).try_facts().expect("decodes")), text(&f));
    }

    #[test]
    fn facts_that_do_not_decode_say_nothing_rather_than_part() {
        let mut held = Held::from(sample());
        // A lab value cut short: what came before it decodes, the rest cannot.
        held.bytes.truncate(held.bytes.len() - 3);
        assert!(held.try_facts().is_err());
        let f = held.facts();
        assert_eq!(f.key, "Patient/p1");
        assert!(f.labs.is_empty() && f.conditions.is_empty() && f.demographics.gender.is_none());
        assert!(!f.present.observations && !f.present.conditions && !f.present.allergies);
    }

    #[test]
    fn a_fact_that_could_not_be_encoded_leaves_nothing_known() {
        let mut held = Held::from(sample());
        assert!(held.try_facts().is_ok());
        // What `encode` hands over when one of the facts failed.
        held.append(None, &[]);
        assert!(matches!(held.try_facts(), Err(HeldError::Encode)));
        let f = held.facts();
        assert!(f.labs.is_empty() && f.conditions.is_empty() && !f.present.observations);
        assert!(Held::with("Patient/x".into(), None).try_facts().is_err());
    }

    #[test]
    fn appended_facts_follow_in_order_and_present_flags_add_up() {
        let mut held = Held::new("Patient/p1".into(), sample().demographics);
        let mut first = sample();
        first.present = Present {
            observations: true,
            ..Default::default()
        };
        let mut second = sample();
        second.conditions[0].code = "N05.9".into();
        second.present = Present {
            medications: true,
            ..Default::default()
        };
        held.add(first);
        held.add(second);
        let f = held.facts();
        let codes: Vec<&str> = f.conditions.iter().map(|c| c.code.as_str()).collect();
        assert_eq!(codes, ["M32.14", "N05.9"]);
        assert_eq!(f.labs[&3].len(), 4);
        assert_eq!(f.labs[&3][2].tie, "a");
        assert!(f.present.observations && f.present.medications && !f.present.conditions);
        assert_eq!(f.demographics.gender.as_deref(), Some("female"));
    }

    #[test]
    fn a_patient_costs_a_few_hundred_bytes_not_kilobytes() {
        use std::mem::size_of;
        let f = sample();
        // What the same facts take as structs, leaving out every string's own allocation.
        let structs = size_of::<PatientFacts>()
            + 4 * size_of::<LabValue>()
            + size_of::<ConditionFact>()
            + size_of::<MedicationFact>()
            + 2 * size_of::<EventFact>()
            + size_of::<AllergyFact>()
            + size_of::<BiopsyFact>();
        let held = Held::from(f);
        assert!(
            held.bytes.len() * 3 < structs,
            "{} bytes held, {structs} as structs",
            held.bytes.len()
        );
    }
}
