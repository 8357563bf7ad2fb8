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
