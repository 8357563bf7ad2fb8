//! A patient's facts as held while a cohort is read: encoded one after another into a few
//! hundred bytes, and decoded into a [`PatientFacts`] only when the patient is evaluated.
//!
//! A cohort's facts are all held at once between the end of the reading and the evaluation,
//! so what one patient costs there is what memory grows by per patient. As structs, a
//! patient with two lab values and a diagnosis is about 1.7 KB (a 400-byte `PatientFacts`
//! with a map of labs, 200-byte lab values each with four strings, the demographics twice);
//! encoded it is about 350 bytes. Encoding each fact once (on the worker that reduced it) and
//! decoding it once (on the worker that evaluates it) costs about what merging and trimming
//! the structs on the main thread did; with fewer pages to fault in, BENCH-LN got faster.
//!
//! The encoding is this module's own (see [`Put`]): the bytes never leave the process, and
//! through serde (postcard) a lab value cost 1,340 instructions to decode and 650 to encode,
//! where it now costs 950 and 510, most of them allocating its strings. Every field of every
//! fact is listed once, in [`record!`]: a field added to a fact and not listed there does
//! not compile.

use super::*;

/// One patient's facts, encoded. Facts are appended in the order they are read, so the
/// lists decoded come out in the order a [`PatientFacts`] built directly would hold them.
#[derive(Debug, Default)]
pub struct Held {
    key: Box<str>,
    present: Present,
    bytes: Vec<u8>,
}

/// Which list of [`PatientFacts`] an item goes to: its first byte.
mod tag {
    pub const DEMOGRAPHICS: u8 = 0;
    /// A lab index, whether the value's `resource` was `Observation/<tie>` and is left out
    /// (what every value read from NDJSON is: the id would otherwise be held twice), then the
    /// value.
    pub const LAB: u8 = 1;
    pub const CONDITION: u8 = 2;
    pub const MEDICATION: u8 = 3;
    pub const PROCEDURE: u8 = 4;
    pub const IMMUNIZATION: u8 = 5;
    pub const ALLERGY: u8 = 6;
    pub const BIOPSY: u8 = 7;
}

const OBSERVATION: &str = "Observation/";

/// A patient's held facts cannot be decoded: the bytes and the code that reads them
/// disagree (a bug), never bad input.
#[derive(Debug, thiserror::Error)]
pub enum HeldError {
    #[error("a patient's held facts cannot be decoded ({0}); this is a bug in trialgate")]
    Decode(&'static str),
}

/// Writes a value onto held bytes: unsigned integers as LEB128 varints, signed ones
/// zigzagged first, floats as their 8 bytes, strings as their length then their bytes, an
/// `Option` and an enum as a byte saying which, then what it holds. [`Take`] reads it back.
trait Put {
    fn put(&self, out: &mut Vec<u8>);
}

/// Reads back what [`Put`] wrote.
trait Take: Sized {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError>;
}

/// Held bytes being decoded.
struct Reader<'a> {
    rest: &'a [u8],
}

const CUT: HeldError = HeldError::Decode("cut short");

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, HeldError> {
        let (&b, rest) = self.rest.split_first().ok_or(CUT)?;
        self.rest = rest;
        Ok(b)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], HeldError> {
        let (b, rest) = self.rest.split_at_checked(n).ok_or(CUT)?;
        self.rest = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, HeldError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(HeldError::Decode("an integer runs over 64 bits"))
    }

    fn str(&mut self) -> Result<&'a str, HeldError> {
        let n = usize::try_from(self.varint()?).map_err(|_| CUT)?;
        let b = self.bytes(n)?;
        if b.is_ascii() {
            // SAFETY: ASCII is UTF-8. (Nearly every held string is: ids, codes, units. The
            // general check costs several times this one on strings this short.)
            return Ok(unsafe { std::str::from_utf8_unchecked(b) });
        }
        std::str::from_utf8(b).map_err(|_| HeldError::Decode("a string is not UTF-8"))
    }

    /// An enum's or an `Option`'s byte, below `n`.
    fn which(&mut self, n: u8) -> Result<u8, HeldError> {
        let b = self.byte()?;
        if b < n {
            Ok(b)
        } else {
            Err(HeldError::Decode("an unknown variant"))
        }
    }
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

impl Put for u64 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(*self, out);
    }
}

impl Take for u64 {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        r.varint()
    }
}

impl Put for usize {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(*self as u64, out);
    }
}

impl Take for usize {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        usize::try_from(r.varint()?).map_err(|_| HeldError::Decode("an index runs over usize"))
    }
}

impl Put for i64 {
    fn put(&self, out: &mut Vec<u8>) {
        put_varint(((self << 1) ^ (self >> 63)) as u64, out);
    }
}

impl Take for i64 {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        let v = r.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }
}

impl Put for f64 {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Take for f64 {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        let b: [u8; 8] = r.bytes(8)?.try_into().map_err(|_| CUT)?;
        Ok(f64::from_le_bytes(b))
    }
}

impl Put for bool {
    fn put(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl Take for bool {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        Ok(r.which(2)? == 1)
    }
}

impl Put for String {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        out.extend_from_slice(self.as_bytes());
    }
}

impl Take for String {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        r.str().map(String::from)
    }
}

impl<T: Put> Put for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                v.put(out);
            }
        }
    }
}

impl<T: Take> Take for Option<T> {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        Ok(match r.which(2)? {
            0 => None,
            _ => Some(T::take(r)?),
        })
    }
}

impl<T: Put> Put for Vec<T> {
    fn put(&self, out: &mut Vec<u8>) {
        self.len().put(out);
        self.iter().for_each(|v| v.put(out));
    }
}

impl<T: Take> Take for Vec<T> {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        let n = usize::take(r)?;
        // Every value takes at least a byte: a length past the bytes left is cut short,
        // and must not reserve memory for it.
        let mut v = Vec::with_capacity(n.min(r.rest.len()));
        for _ in 0..n {
            v.push(T::take(r)?);
        }
        Ok(v)
    }
}

impl<A: Put, B: Put> Put for (A, B) {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
        self.1.put(out);
    }
}

impl<A: Take, B: Take> Take for (A, B) {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        Ok((A::take(r)?, B::take(r)?))
    }
}

impl Put for Instant {
    fn put(&self, out: &mut Vec<u8>) {
        self.0.put(out);
    }
}

impl Take for Instant {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        i64::take(r).map(Instant)
    }
}

impl Put for Date {
    fn put(&self, out: &mut Vec<u8>) {
        self.days().put(out);
    }
}

impl Take for Date {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        i64::take(r).map(Date::from_days)
    }
}

/// An enum of unit variants, as the index of its variant.
macro_rules! variants {
    ($t:ident { $($v:ident),+ $(,)? }) => {
        impl Put for $t {
            fn put(&self, out: &mut Vec<u8>) {
                out.push(*self as u8);
            }
        }

        impl Take for $t {
            fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
                const ALL: &[$t] = &[$($t::$v),+];
                ALL.get(usize::from(r.byte()?)).copied().ok_or(HeldError::Decode("an unknown variant"))
            }
        }
    };
}

variants!(Bound { AtMost, AtLeast });
variants!(MedSource {
    Request,
    Statement,
    Administration
});

/// A struct, as its fields one after another. `Put` destructures it whole and `Take` builds
/// it whole: a field left out of the list does not compile.
macro_rules! record {
    ($t:ident { $($f:ident),+ $(,)? }) => {
        impl Put for $t {
            fn put(&self, out: &mut Vec<u8>) {
                let $t { $($f),+ } = self;
                $($f.put(out);)+
            }
        }

        impl Take for $t {
            fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
                // Struct expressions evaluate their fields in the order written.
                Ok($t { $($f: Take::take(r)?),+ })
            }
        }
    };
}

record!(Bounded { value, bound });
record!(LabValue {
    resource,
    tie,
    time,
    code,
    equation,
    raw_value,
    raw_text,
    raw_unit,
    reading,
    uln
});
record!(ConditionFact {
    resource,
    sets,
    code,
    clinical,
    onset,
    abatement,
    abated_undated,
    recorded
});
record!(MedicationFact {
    resource,
    source,
    sets,
    code,
    start,
    end,
    ongoing,
    finished,
    routes,
    dose_g,
    dose_text
});
record!(EventFact {
    resource,
    sets,
    code,
    time,
    end
});
record!(AllergyFact { resource, sets, code });
record!(BiopsyFact {
    kind,
    resource,
    time,
    classes
});
record!(Deceased { when, text });
record!(Person { name, mrn });
record!(Demographics {
    birth_date,
    birth_text,
    gender,
    deceased,
    inactive,
    replaced_by,
    person
});

impl Put for Reading {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Reading::Number(b) => {
                out.push(0);
                b.put(out);
            }
            Reading::Unconvertible { raw_unit } => {
                out.push(1);
                raw_unit.put(out);
            }
            Reading::BadComparator(s) => {
                out.push(2);
                s.put(out);
            }
            Reading::Result(s) => {
                out.push(3);
                s.put(out);
            }
        }
    }
}

impl Take for Reading {
    fn take(r: &mut Reader<'_>) -> Result<Self, HeldError> {
        Ok(match r.which(4)? {
            0 => Reading::Number(Bounded::take(r)?),
            1 => Reading::Unconvertible {
                raw_unit: String::take(r)?,
            },
            2 => Reading::BadComparator(String::take(r)?),
            _ => Reading::Result(String::take(r)?),
        })
    }
}

/// Writes `item` after its tag.
fn put(tag: u8, item: &impl Put, out: &mut Vec<u8>) {
    out.push(tag);
    item.put(out);
}

/// Encodes the facts of `f` (not its key nor its demographics) onto `out`; returns which
/// kinds of record the patient has, which the encoding does not carry.
pub fn encode(f: PatientFacts, out: &mut Vec<u8>) -> Present {
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
    for (lab, values) in labs {
        for mut v in values {
            let named = v.resource.strip_prefix(OBSERVATION) == Some(v.tie.as_str());
            if named {
                v.resource = String::new();
            }
            put(tag::LAB, &(lab, named), out);
            v.put(out);
        }
    }
    conditions.iter().for_each(|x| put(tag::CONDITION, x, out));
    medications.iter().for_each(|x| put(tag::MEDICATION, x, out));
    procedures.iter().for_each(|x| put(tag::PROCEDURE, x, out));
    immunizations.iter().for_each(|x| put(tag::IMMUNIZATION, x, out));
    allergies.iter().for_each(|x| put(tag::ALLERGY, x, out));
    biopsies.iter().for_each(|x| put(tag::BIOPSY, x, out));
    present
}

impl Held {
    /// A patient with no facts yet.
    pub fn new(key: String, demographics: Demographics) -> Held {
        Held::with(key, Self::demographics(&demographics))
    }

    /// Encodes demographics for [`Held::with`] (on the thread that read the Patient: the
    /// one that registers patients is the one that waits).
    pub fn demographics(d: &Demographics) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(64);
        put(tag::DEMOGRAPHICS, d, &mut bytes);
        bytes.shrink_to_fit();
        bytes
    }

    /// A patient with no facts yet, and demographics encoded by [`Held::demographics`].
    pub fn with(key: String, demographics: Vec<u8>) -> Held {
        Held {
            key: key.into_boxed_str(),
            present: Present::default(),
            bytes: demographics,
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
    pub fn append(&mut self, present: Present, encoded: &[u8]) {
        self.present.or(present);
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

    /// The patient's facts, decoded, for evaluation. Should they not decode (a bug), the
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
        let mut f = PatientFacts {
            key: String::from(&*self.key),
            present: self.present,
            ..Default::default()
        };
        let r = &mut Reader { rest: &self.bytes };
        while !r.rest.is_empty() {
            match r.which(tag::BIOPSY + 1)? {
                tag::DEMOGRAPHICS => f.demographics = Take::take(r)?,
                tag::LAB => {
                    let (lab, named) = <(usize, bool)>::take(r)?;
                    let mut v = LabValue::take(r)?;
                    if named {
                        v.resource = [OBSERVATION, &v.tie].concat();
                    }
                    f.labs.entry(lab).or_default().push(v)
                }
                tag::CONDITION => f.conditions.push(Take::take(r)?),
                tag::MEDICATION => f.medications.push(Take::take(r)?),
                tag::PROCEDURE => f.procedures.push(Take::take(r)?),
                tag::IMMUNIZATION => f.immunizations.push(Take::take(r)?),
                tag::ALLERGY => f.allergies.push(Take::take(r)?),
                _ => f.biopsies.push(Take::take(r)?),
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
    fn bytes_that_are_not_facts_are_refused_not_misread() {
        let whole = Held::from(sample());
        let with = |extra: &[u8]| {
            let mut held = Held::from(sample());
            held.bytes.extend_from_slice(extra);
            held.try_facts().map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(with(&[]), Ok(()));
        // A tag no fact has; a lab whose `named` flag is neither 0 nor 1; a condition whose
        // resource is not UTF-8; a lab index whose varint never ends.
        assert!(with(&[tag::BIOPSY + 1]).is_err_and(|e| e.contains("unknown variant")));
        assert!(with(&[tag::LAB, 3, 2]).is_err_and(|e| e.contains("unknown variant")));
        assert!(with(&[tag::CONDITION, 2, 0xff, 0xfe]).is_err_and(|e| e.contains("not UTF-8")));
        assert!(with(&[tag::LAB, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err_and(|e| e.contains("64 bits")));
        // A list said to hold more than the bytes left: refused without reserving for it.
        assert!(with(&[tag::CONDITION, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err_and(|e| e.contains("cut short")));
        assert_eq!(text(&whole.facts()), text(&sample()));
    }

    #[test]
    fn integers_keep_their_sign_and_size() {
        for v in [0, 1, -1, 63, -64, 64, 1_700_000_000, -62_135_596_800, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            v.put(&mut out);
            let r = &mut Reader { rest: &out };
            assert_eq!(i64::take(r).ok(), Some(v));
            assert!(r.rest.is_empty());
        }
        for v in [0, 127, 128, 300, u64::MAX] {
            let mut out = Vec::new();
            v.put(&mut out);
            assert_eq!(out.len(), (64 - v.leading_zeros() as usize).div_ceil(7).max(1));
            assert_eq!(u64::take(&mut Reader { rest: &out }).ok(), Some(v));
        }
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
