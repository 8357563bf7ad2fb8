//! Report writers: the JSON report (a stable contract, documented in the README), a text
//! summary for a person, CSV with one row per patient and trial, and the coordinator's page
//! (`page`).

pub mod page;

use crate::Screening;
use crate::criteria::eval::TrialResult;
use crate::criteria::{Kind, Outcome, Status};
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Serialize)]
struct UnmappedOut<'a> {
    system: &'a str,
    code: &'a str,
    unit: &'a str,
    count: usize,
}

#[derive(Serialize)]
struct Summary {
    patients: usize,
    trials: Vec<TrialSummary>,
}

#[derive(Serialize)]
struct TrialSummary {
    trial: String,
    eligible: usize,
    potentially_eligible: usize,
    ineligible: usize,
    error: usize,
}

/// What a report says after the results: known only once every patient is screened.
pub struct Totals<'a> {
    pub patients: usize,
    pub provenance: &'a crate::Provenance,
    pub unmapped: &'a crate::facts::Unmapped,
    pub issues: &'a [crate::fhir::InputIssue],
}

#[derive(Serialize)]
struct Tail<'a> {
    provenance: &'a crate::Provenance,
    unmapped: Vec<UnmappedOut<'a>>,
    input_issues: &'a [crate::fhir::InputIssue],
    summary: Summary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
    Csv,
    /// A page for the study coordinator: per trial, patients by status with the deciding
    /// criteria and what is unknown or needs review; filterable and sortable.
    Html,
}

impl Format {
    /// The detail of evaluation this format needs: CSV prints criterion ids only (never a
    /// reason, evidence or fact), so it is written from outcome-only results; every other
    /// format shows the explanations.
    pub fn detail(self) -> crate::criteria::Detail {
        match self {
            Format::Csv => crate::criteria::Detail::Outcome,
            Format::Json | Format::Text | Format::Html => crate::criteria::Detail::Full,
        }
    }
}

/// Writes a report as the results come, so that a cohort of any size is reported without
/// holding its results: the JSON contract puts `results` first and everything that needs
/// the whole run (provenance with its inputs, unmapped codes, input issues, the summary) after.
pub struct Writer<W: std::io::Write> {
    out: W,
    format: Format,
    results: usize,
    trials: Vec<TrialSummary>,
    current: String,
    error: Option<std::io::Error>,
    rows: Vec<page::PageRow>,
    /// The CSV row being written, and one field of it: kept to be reused.
    row: String,
    field: String,
    as_of: crate::time::Date,
    version: String,
    link_base: Option<String>,
    previous: std::collections::HashMap<(String, String), Status>,
}

impl<W: std::io::Write> Writer<W> {
    /// Links each evidence item of the HTML page to its resource on this FHIR server.
    pub fn link_to(mut self, base: &str) -> Self {
        self.link_base = Some(base.trim_end_matches('/').to_string());
        self
    }

    /// Tells the HTML page each (patient, trial) whose status was different before, and what
    /// it was: those rows are marked newly eligible or newly ineligible and show the previous
    /// status; the newly eligible come first. `screen` has no history and marks none.
    pub fn changes(mut self, previous: std::collections::HashMap<(String, String), Status>) -> Self {
        self.previous = previous;
        self
    }

    /// Starts a report; `patients` is only used by the text format's heading.
    pub fn new(out: W, format: Format, as_of: crate::time::Date, version: &str, patients: usize) -> Writer<W> {
        let mut w = Writer {
            out,
            format,
            results: 0,
            trials: Vec::new(),
            current: String::new(),
            error: None,
            rows: Vec::new(),
            row: String::new(),
            field: String::new(),
            as_of,
            version: version.to_string(),
            link_base: None,
            previous: std::collections::HashMap::new(),
        };
        let head = match format {
            Format::Json => format!("{{\n  \"as_of\": \"{as_of}\",\n  \"results\": ["),
            Format::Csv => "patient,trial,status,decided_by,unknown,manual\n".to_string(),
            Format::Text => format!("trialgate {version} — screening as of {as_of} — {patients} patient(s)\n\n"),
            Format::Html => String::new(),
        };
        w.put(head.as_bytes());
        w
    }

    fn put(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            if let Err(e) = self.out.write_all(bytes) {
                self.error = Some(e);
            }
        }
    }

    pub fn result(&mut self, r: &TrialResult) {
        count(&mut self.trials, r);
        let text = match self.format {
            Format::Json => {
                // Serializing plain structs of strings and numbers cannot fail.
                let one = serde_json::to_string_pretty(r).unwrap_or_default().replace('\n', "\n    ");
                format!("{}\n    {one}", if self.results == 0 { "" } else { "," })
            }
            Format::Csv => {
                // One row per result, and 100,000s of them: written through reused buffers.
                let (mut row, mut field) = (std::mem::take(&mut self.row), std::mem::take(&mut self.field));
                csv_row(&mut row, &mut field, r);
                self.results += 1;
                self.put(row.as_bytes());
                (self.row, self.field) = (row, field);
                return;
            }
            Format::Html => {
                self.rows.push(page::PageRow::of(r));
                String::new()
            }
            Format::Text => {
                let mut out = String::new();
                if r.patient != self.current {
                    self.current = r.patient.clone();
                    let _ = writeln!(out, "{}", r.patient);
                }
                text_result(&mut out, r);
                out
            }
        };
        self.results += 1;
        self.put(text.as_bytes());
    }

    /// Writes what follows the results, flushes, and returns the writer's first error.
    pub fn finish(mut self, t: &Totals) -> std::io::Result<W> {
        let summary = Summary {
            patients: t.patients,
            trials: std::mem::take(&mut self.trials),
        };
        match self.format {
            Format::Json => {
                let tail = Tail {
                    provenance: t.provenance,
                    unmapped: t
                        .unmapped
                        .counts
                        .iter()
                        .map(|((system, code, unit), count)| UnmappedOut {
                            system,
                            code,
                            unit,
                            count: *count,
                        })
                        .collect(),
                    input_issues: t.issues,
                    summary,
                };
                let tail = serde_json::to_string_pretty(&tail).unwrap_or_default();
                let close = if self.results == 0 { "]" } else { "\n  ]" };
                let text = format!("{close},\n{}\n", tail.strip_prefix("{\n").unwrap_or(&tail));
                self.put(text.as_bytes());
            }
            Format::Csv => {}
            Format::Text => {
                let text = text_tail(&summary, t);
                self.put(text.as_bytes());
            }
            Format::Html => {
                for r in &mut self.rows {
                    r.previous = self.previous.get(&(r.patient.clone(), r.trial.clone())).copied();
                }
                let intro = format!(
                    "{} patient(s) screened by trialgate {} (configuration {}). {} input problem(s), {} unmapped code(s): see the JSON report.",
                    t.patients,
                    self.version,
                    t.provenance.config_hash.get(..12).unwrap_or_default(),
                    t.issues.len(),
                    t.unmapped.counts.len()
                );
                let trials: Vec<String> = summary.trials.iter().map(|t| t.trial.clone()).collect();
                let rows: Vec<&page::PageRow> = self.rows.iter().collect();
                let html = page::page(&page::PageView {
                    title: &format!("Trial candidates as of {}", self.as_of),
                    intro: &intro,
                    trials: &trials,
                    rows: &rows,
                    link_base: self.link_base.as_deref(),
                    account: None,
                    sign_out: false,
                });
                self.put(html.as_bytes());
            }
        }
        if self.error.is_none() {
            if let Err(e) = self.out.flush() {
                self.error = Some(e);
            }
        }
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }
}

fn count(trials: &mut Vec<TrialSummary>, r: &TrialResult) {
    let i = match trials.iter().position(|t| t.trial == r.trial) {
        Some(i) => i,
        None => {
            trials.push(TrialSummary {
                trial: r.trial.clone(),
                eligible: 0,
                potentially_eligible: 0,
                ineligible: 0,
                error: 0,
            });
            trials.len() - 1
        }
    };
    let t = &mut trials[i];
    match r.status {
        Status::Eligible => t.eligible += 1,
        Status::PotentiallyEligible => t.potentially_eligible += 1,
        Status::Ineligible => t.ineligible += 1,
        Status::Error => t.error += 1,
    }
}

/// A whole report of a screening held in memory.
pub fn render(s: &Screening, format: Format) -> String {
    render_linked(s, format, None)
}

/// [`render`], the HTML page linking evidence to its resources on the FHIR server at `base`.
pub fn render_linked(s: &Screening, format: Format, base: Option<&str>) -> String {
    render_marked(s, format, base, std::collections::HashMap::new())
}

/// [`render_linked`], the HTML page also marking the (patient, trial)s whose status was
/// `previous` before (see [`Writer::changes`]): a sweep's changes since its last run.
pub fn render_marked(
    s: &Screening,
    format: Format,
    base: Option<&str>,
    previous: std::collections::HashMap<(String, String), Status>,
) -> String {
    let mut w = Writer::new(Vec::new(), format, s.as_of, &s.provenance.version, s.patients).changes(previous);
    if let Some(b) = base {
        w = w.link_to(b);
    }
    for r in &s.results {
        w.result(r);
    }
    let totals = Totals {
        patients: s.patients,
        provenance: &s.provenance,
        unmapped: &s.unmapped,
        issues: &s.issues,
    };
    // Writing to memory cannot fail.
    let bytes = w.finish(&totals).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn json(s: &Screening) -> String {
    render(s, Format::Json)
}

pub fn csv(s: &Screening) -> String {
    render(s, Format::Csv)
}

pub fn text(s: &Screening) -> String {
    render(s, Format::Text)
}

pub fn html(s: &Screening) -> String {
    render(s, Format::Html)
}

fn ids(r: &TrialResult, outcome: Outcome) -> Vec<&str> {
    r.criteria.iter().filter(|c| c.outcome == outcome).map(|c| c.id.as_str()).collect()
}

/// Appends `s` as a CSV field: quoted when it holds a comma, a quote or a line break. (Looked
/// for bytewise: matching a pattern of chars cost about 250 instructions per field, three
/// fields a row, on the thread that writes the rows while the others evaluate.)
fn csv_field(out: &mut String, s: &str) {
    if memchr::memchr3(b',', b'"', b'\n', s.as_bytes()).is_some() {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

/// Appends `ids`, separated by spaces.
fn push_ids<'a>(out: &mut String, ids: impl Iterator<Item = &'a str>) {
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(id);
    }
}

/// Writes `r` as one CSV row into `row` (cleared first); `field` is scratch space.
fn csv_row(row: &mut String, field: &mut String, r: &TrialResult) {
    row.clear();
    csv_field(row, &r.patient);
    row.push(',');
    csv_field(row, &r.trial);
    row.push(',');
    row.push_str(r.status.as_str());
    row.push(',');
    // decided_by: the record's reason first, then the deciding criteria; one field.
    field.clear();
    if let Some(rec) = &r.record {
        field.push_str("record: ");
        field.push_str(rec);
        if !r.decided_by.is_empty() {
            field.push_str("; ");
        }
    }
    push_ids(field, r.decided_by.iter().map(|d| d.id.as_str()));
    csv_field(row, field);
    for outcome in [Outcome::Unknown, Outcome::Manual] {
        row.push(',');
        push_ids(row, r.criteria.iter().filter(|c| c.outcome == outcome).map(|c| c.id.as_str()));
    }
    row.push('\n');
}

fn short(s: &str, n: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn text_result(out: &mut String, r: &TrialResult) {
    let _ = writeln!(out, "  {:<28} {}", r.trial, r.status.as_str().to_uppercase());
    if let Some(rec) = &r.record {
        let _ = writeln!(out, "      not a candidate: {rec}");
    }
    for c in &r.criteria {
        let deciding =
            (c.kind == Kind::Inclusion && c.outcome == Outcome::NotMet) || (c.kind == Kind::Exclusion && c.outcome == Outcome::Met);
        if deciding {
            let _ = writeln!(out, "      ✗ {} [{}] \"{}\"", c.id, c.kind.as_str(), short(&c.text, 90));
            let _ = writeln!(out, "          {}", short(&c.reason, 160));
        }
    }
    if matches!(r.status, Status::Eligible | Status::PotentiallyEligible) {
        for c in r.criteria.iter().filter(|c| c.outcome == Outcome::Unknown) {
            let _ = writeln!(out, "      ? {}: {}", c.id, short(&c.reason, 150));
        }
        let manual = ids(r, Outcome::Manual);
        if !manual.is_empty() {
            let _ = writeln!(out, "      manual review ({}): {}", manual.len(), manual.join(", "));
        }
    }
}

fn text_tail(sum: &Summary, t: &Totals) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nSummary: eligible / potentially eligible / ineligible / error");
    for t in &sum.trials {
        let _ = writeln!(
            out,
            "  {:<28} {:>5} / {:>5} / {:>5} / {:>5}",
            t.trial, t.eligible, t.potentially_eligible, t.ineligible, t.error
        );
    }
    if !t.issues.is_empty() {
        let _ = writeln!(out, "\nInput problems ({}), each skipped:", t.issues.len());
        for i in t.issues {
            let _ = writeln!(out, "  {}: {}", i.location, short(&i.message, 200));
        }
    }
    if !t.unmapped.counts.is_empty() {
        let _ = writeln!(
            out,
            "\n{} code/unit combination(s) seen but not mapped (see `unmapped` in --format json)",
            t.unmapped.counts.len()
        );
    }
    out
}

#[cfg(test)]
mod csv_tests {
    use super::csv_field;

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        let field = |s: &str| {
            let mut out = String::new();
            csv_field(&mut out, s);
            out
        };
        assert_eq!(field("Patient/a-1"), "Patient/a-1");
        assert_eq!(field(""), "");
        assert_eq!(field("record: deceased; inc-1 exc-2"), "record: deceased; inc-1 exc-2");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"no\""), "\"say \"\"no\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        // Past the 16 or 32 bytes a vector compare takes at once.
        let long = format!("{},{}", "x".repeat(40), "y".repeat(40));
        assert_eq!(field(&long), format!("\"{long}\""));
    }
}
