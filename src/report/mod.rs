//! Report writers: the JSON report (a stable contract, documented in the README), a text
//! summary for a person, and CSV with one row per patient and trial.

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

/// What the HTML page shows of one result: small, so a page can be built for a whole run.
struct HtmlRow {
    patient: String,
    trial: String,
    status: Status,
    deciding: Vec<(String, String)>,
    unknown: Vec<(String, String)>,
    manual: Vec<String>,
    evidence: Vec<String>,
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
    rows: Vec<HtmlRow>,
    as_of: crate::time::Date,
    version: String,
    link_base: Option<String>,
}

impl<W: std::io::Write> Writer<W> {
    /// Links each evidence item of the HTML page to its resource on this FHIR server.
    pub fn link_to(mut self, base: &str) -> Self {
        self.link_base = Some(base.trim_end_matches('/').to_string());
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
            as_of,
            version: version.to_string(),
            link_base: None,
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
            Format::Csv => csv_row(r),
            Format::Html => {
                let pick = |o: Outcome| -> Vec<(String, String)> {
                    r.criteria
                        .iter()
                        .filter(|c| c.outcome == o)
                        .map(|c| (c.id.clone(), c.reason.clone()))
                        .collect()
                };
                let deciding = r
                    .criteria
                    .iter()
                    .filter(|c| r.decided_by.iter().any(|d| d.id == c.id))
                    .map(|c| (c.id.clone(), c.reason.clone()))
                    .chain(r.record.iter().map(|rec| ("record".to_string(), rec.clone())))
                    .collect();
                let mut evidence: Vec<String> = r
                    .criteria
                    .iter()
                    .flat_map(|c| c.evidence.iter().map(|e| e.resource.clone()))
                    .collect();
                evidence.sort();
                evidence.dedup();
                self.rows.push(HtmlRow {
                    patient: r.patient.clone(),
                    trial: r.trial.clone(),
                    status: r.status,
                    deciding,
                    unknown: pick(Outcome::Unknown),
                    manual: pick(Outcome::Manual).into_iter().map(|(id, _)| id).collect(),
                    evidence,
                });
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
                let page = html_page(&self.rows, &summary, t, self.as_of, &self.version, self.link_base.as_deref());
                self.put(page.as_bytes());
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
    let mut w = Writer::new(Vec::new(), format, s.as_of, &s.provenance.version, s.patients);
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(r: &TrialResult) -> String {
    let deciding: Vec<&str> = r.decided_by.iter().map(|d| d.id.as_str()).collect();
    let mut deciding = deciding.join(" ");
    if let Some(rec) = &r.record {
        deciding = if deciding.is_empty() {
            format!("record: {rec}")
        } else {
            format!("record: {rec}; {deciding}")
        };
    }
    format!(
        "{},{},{},{},{},{}\n",
        csv_field(&r.patient),
        csv_field(&r.trial),
        r.status.as_str(),
        csv_field(&deciding),
        ids(r, Outcome::Unknown).join(" "),
        ids(r, Outcome::Manual).join(" ")
    )
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

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Sorting and filtering, in plain script: no build step, nothing fetched.
const PAGE_SCRIPT: &str = r#"
function filterRows() {
  const q = document.getElementById('q').value.toLowerCase();
  const shown = new Set([...document.querySelectorAll('input.status:checked')].map(b => b.value));
  document.querySelectorAll('tbody tr').forEach(tr => {
    tr.hidden = !(shown.has(tr.dataset.status) && tr.textContent.toLowerCase().includes(q));
  });
}
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  [...body.rows].sort((a, b) => (a.cells[i].dataset.key || a.cells[i].textContent)
      .localeCompare(b.cells[i].dataset.key || b.cells[i].textContent) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
}
"#;

const PAGE_STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
table{border-collapse:collapse;width:100%;margin-bottom:2rem}th,td{border:1px solid #ccc;padding:.3rem .5rem;vertical-align:top;text-align:left}\
th{background:#f3f3f3;cursor:pointer}tr.eligible td:nth-child(2){color:#0a6d2c;font-weight:600}\
tr.potentially-eligible td:nth-child(2){color:#8a5a00;font-weight:600}tr.ineligible td:nth-child(2){color:#777}\
tr.error td:nth-child(2){color:#b00020;font-weight:600}ul{margin:0;padding-left:1.1rem}small{color:#555}";

fn html_page(rows: &[HtmlRow], summary: &Summary, t: &Totals, as_of: crate::time::Date, version: &str, link_base: Option<&str>) -> String {
    let rank = |s: Status| match s {
        Status::Eligible => 0,
        Status::PotentiallyEligible => 1,
        Status::Error => 2,
        Status::Ineligible => 3,
    };
    let list = |items: &[(String, String)]| -> String {
        if items.is_empty() {
            return String::new();
        }
        let li: String = items
            .iter()
            .map(|(id, why)| format!("<li><b>{}</b> {}</li>", esc(id), esc(why)))
            .collect();
        format!("<ul>{li}</ul>")
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>trialgate: screening as of {as_of}</title>\
         <style>{PAGE_STYLE}</style><script>{PAGE_SCRIPT}</script></head><body>\n\
         <h1>Trial candidates as of {as_of}</h1>\n<p>{} patient(s) screened by trialgate {} (configuration {}). \
         {} input problem(s), {} unmapped code(s): see the JSON report.</p>\n\
         <p><label>Find <input id=\"q\" oninput=\"filterRows()\" placeholder=\"patient, criterion, reason\"></label> ",
        t.patients,
        esc(version),
        esc(t.provenance.config_hash.get(..12).unwrap_or_default()),
        t.issues.len(),
        t.unmapped.counts.len()
    );
    for (value, label, on) in [
        ("eligible", "eligible", true),
        ("potentially-eligible", "potentially eligible", true),
        ("error", "error", true),
        ("ineligible", "ineligible", false),
    ] {
        let _ = write!(
            out,
            "<label><input type=\"checkbox\" class=\"status\" value=\"{value}\"{} onchange=\"filterRows()\"> {label}</label> ",
            if on { " checked" } else { "" }
        );
    }
    out.push_str("</p>\n");
    for trial in &summary.trials {
        let _ = write!(
            out,
            "<section id=\"trial-{id}\"><h2>{id}</h2><p>{} eligible, {} potentially eligible, {} ineligible, {} error</p>\n\
             <table><thead><tr><th onclick=\"sortBy(this)\">Patient</th><th onclick=\"sortBy(this)\">Status</th>\
             <th>Deciding</th><th>Unknown</th><th>Needs review</th><th>Evidence</th></tr></thead><tbody>\n",
            trial.eligible,
            trial.potentially_eligible,
            trial.ineligible,
            trial.error,
            id = esc(&trial.trial)
        );
        let mut mine: Vec<&HtmlRow> = rows.iter().filter(|r| r.trial == trial.trial).collect();
        mine.sort_by(|a, b| rank(a.status).cmp(&rank(b.status)).then_with(|| a.patient.cmp(&b.patient)));
        for r in mine {
            let evidence: String = r
                .evidence
                .iter()
                .map(|e| match link_base {
                    Some(base) => format!("<a href=\"{}/{}\">{}</a> ", esc(base), esc(e), esc(e)),
                    None => format!("{} ", esc(e)),
                })
                .collect();
            let status = r.status.as_str();
            let _ = writeln!(
                out,
                "<tr class=\"{status}\" data-status=\"{status}\"{}><td>{}</td><td data-key=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td><small>{}</small></td></tr>",
                if status == "ineligible" { " hidden" } else { "" },
                esc(&r.patient),
                rank(r.status),
                status.replace('-', " "),
                list(&r.deciding),
                list(&r.unknown),
                esc(&r.manual.join(", ")),
                evidence.trim_end()
            );
        }
        out.push_str("</tbody></table></section>\n");
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn page_text_is_escaped() {
        assert_eq!(
            esc("UPCR <0.2 & \"x\" 'y' >1"),
            "UPCR &lt;0.2 &amp; &quot;x&quot; &#39;y&#39; &gt;1"
        );
    }
}
