//! Trial files -> rules; rules x facts -> verdicts. `trial` reads and checks trial files at
//! load time; `eval` is the pure evaluator (no I/O, no clock: the screening date is an
//! argument); `decisions` applies coordinators' recorded answers to manual items.

pub mod decisions;
pub mod eval;
pub mod trial;

use serde::{Deserialize, Serialize};

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
