//! Coordinators' recorded answers to what data cannot decide (`--decisions FILE`).
//!
//! A decision answers one criterion for one patient and trial, says who answered and when,
//! and may expire. It only replaces a `manual` or `unknown` outcome: data that decides a
//! criterion is never overridden by a note. A later sweep reuses the same file, so `eligible`
//! becomes reachable once a person has answered the manual items.

use super::Outcome;
use crate::config::{ConfigError, Located, read_yaml};
use crate::time::Date;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionSpec {
    patient: String,
    trial: String,
    criterion: String,
    answer: Outcome,
    by: String,
    at: String,
    #[serde(default)]
    expires: Option<String>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub patient: String,
    pub trial: String,
    pub criterion: String,
    pub answer: Outcome,
    pub by: String,
    pub at: Date,
    pub expires: Option<Date>,
    pub note: Option<String>,
}

/// How a decision shows in the report.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Applied {
    pub answer: Outcome,
    pub by: String,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Decision {
    pub fn reason(&self) -> String {
        let mut s = format!("answered {} by {} on {}", self.answer.as_str(), self.by, self.at);
        if let Some(n) = &self.note {
            s = format!("{s}: {n}");
        }
        s
    }

    pub fn applied(&self) -> Applied {
        Applied {
            answer: self.answer,
            by: self.by.clone(),
            at: self.at.to_string(),
            expires: self.expires.map(|d| d.to_string()),
            note: self.note.clone(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Decisions {
    list: Vec<Decision>,
}

fn patient_key(p: &str) -> String {
    if p.contains('/') || p.starts_with("urn:") {
        p.to_string()
    } else {
        format!("Patient/{p}")
    }
}

impl Decisions {
    pub fn load(path: &Path) -> Result<Decisions, ConfigError> {
        let specs: Vec<Located<DecisionSpec>> = read_yaml(path)?;
        let mut errors = Vec::new();
        let mut list = Vec::new();
        for s in specs {
            let d = s.value;
            let at = Date::parse(&d.at);
            let expires = d.expires.as_deref().map(Date::parse);
            if at.is_none() {
                errors.push(ConfigError::at(path, s.line, format!("`at: {}` is not a date (YYYY-MM-DD)", d.at)));
            }
            if matches!(expires, Some(None)) {
                errors.push(ConfigError::at(path, s.line, "`expires` is not a date (YYYY-MM-DD)".into()));
            }
            if !matches!(d.answer, Outcome::Met | Outcome::NotMet) {
                errors.push(ConfigError::at(
                    path,
                    s.line,
                    format!("answer `{}` must be `met` or `not-met`", d.answer.as_str()),
                ));
            }
            let valid = matches!(d.answer, Outcome::Met | Outcome::NotMet) && !matches!(expires, Some(None));
            if let (Some(at), true) = (at, valid) {
                list.push(Decision {
                    patient: patient_key(&d.patient),
                    trial: d.trial,
                    criterion: d.criterion,
                    answer: d.answer,
                    by: d.by,
                    at,
                    expires: expires.flatten(),
                    note: d.note,
                });
            }
        }
        if errors.is_empty() {
            Ok(Decisions { list })
        } else {
            Err(ConfigError::Many(errors))
        }
    }

    /// The latest decision in force on `as_of` for this patient, trial and criterion.
    pub fn find(&self, patient: &str, trial: &str, criterion: &str, as_of: Date) -> Option<&Decision> {
        // Asked for every criterion left unknown or manual, of every patient: most runs
        // record no decision at all.
        if self.list.is_empty() {
            return None;
        }
        self.list
            .iter()
            .filter(|d| d.patient == patient && d.trial == trial && d.criterion == criterion)
            .filter(|d| d.at <= as_of && d.expires.is_none_or(|e| e >= as_of))
            .max_by_key(|d| d.at)
    }

    /// Decisions naming a trial or criterion that is not loaded: surely a typo.
    pub fn dangling<'a>(&'a self, known: &'a [(String, Vec<String>)]) -> impl Iterator<Item = &'a Decision> + 'a {
        self.list
            .iter()
            .filter(move |d| !known.iter().any(|(t, cs)| *t == d.trial && cs.contains(&d.criterion)))
    }
}
