//! Trial files -> rules; rules x facts -> verdicts. `trial` reads and checks trial files at
//! load time; `eval` is the pure evaluator (no I/O, no clock: the screening date is an
//! argument); `decisions` applies coordinators' recorded answers to manual items.

pub mod decisions;
pub mod eval;
pub mod trial;

use serde::{Deserialize, Serialize};

/// A criterion's id, as the trial and every result naming it hold it: interned, so that a
/// result names its criterion with a copy. A `String` per result was an allocation per
/// criterion and patient; an `Arc<str>` shared one count per criterion, whose cache line
/// went back and forth between the threads evaluating (which took a reference) and the one
/// writing the results (which dropped it): half of the time spent in `evaluate`.
///
/// Interned strings live as long as the process. They are criterion ids from trial files
/// and from the verdicts of those trials stored in a sweep's state: a few hundred at most,
/// the same ones again when a trial file is reloaded.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(&'static str);

impl Id {
    pub fn new(id: &str) -> Id {
        use std::collections::BTreeSet;
        use std::sync::{Mutex, PoisonError};
        static IDS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
        // The set is whole after every insert: a panic elsewhere while it was held leaves
        // nothing half done.
        let mut ids = IDS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&known) = ids.get(id) {
            return Id(known);
        }
        let leaked: &'static str = Box::leak(Box::from(id));
        ids.insert(leaked);
        Id(leaked)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl std::ops::Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl std::fmt::Debug for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.0, f)
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl From<&str> for Id {
    fn from(id: &str) -> Id {
        Id::new(id)
    }
}

impl PartialEq<str> for Id {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Id {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        std::borrow::Cow::<'de, str>::deserialize(d).map(|s| Id::new(&s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Met,
    NotMet,
    Unknown,
    Manual,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::NotMet => "not-met",
            Outcome::Unknown => "unknown",
            Outcome::Manual => "manual",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Inclusion,
    Exclusion,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Inclusion => "inclusion",
            Kind::Exclusion => "exclusion",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Eligible,
    PotentiallyEligible,
    Ineligible,
    /// The patient's data could not be fetched; `record` says why. Never a verdict.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Eligible => "eligible",
            Status::PotentiallyEligible => "potentially-eligible",
            Status::Ineligible => "ineligible",
            Status::Error => "error",
        }
    }
}

/// How much of the "why" an evaluation builds. The outcomes are the same at every level (the
/// same rule functions compute them); only the explanations differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Detail {
    /// Reasons, evidence and facts for every criterion: what the JSON, text and HTML reports,
    /// the sweep's state and write-back read.
    #[default]
    Full,
    /// Outcomes only: per-criterion id, kind, outcome and applied decision, the status, what
    /// decided it and the record's reason (deceased, merged, inactive). Reasons are empty, texts
    /// and notes are empty, no evidence, no facts, no person. For outputs that print no
    /// explanation (CSV), where building them would be most of the evaluation's cost.
    Outcome,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_interned_once_and_reads_and_writes_as_its_text() {
        let a = Id::new("I1-interned");
        let b = Id::from(String::from("I1-interned").as_str());
        assert!(std::ptr::eq(a.as_str(), b.as_str()), "the same text is one string");
        assert!(!std::ptr::eq(a.as_str(), Id::new("I2-interned").as_str()));
        assert_eq!(a, "I1-interned");
        assert_eq!(serde_json::to_string(&a).ok().as_deref(), Some("\"I1-interned\""));
        // Read from JSON (stored verdicts), escaped or not, it is the same interned string.
        for json in ["\"I1-interned\"", "\"I1\\u002dinterned\""] {
            let back: Id = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert!(std::ptr::eq(back.as_str(), a.as_str()), "{json}");
        }
        assert_eq!(format!("{a} {a:?}"), "I1-interned \"I1-interned\"");
    }
}
