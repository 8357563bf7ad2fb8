//! The coordinator's page: per trial, the patients by status with their name and MRN, the
//! deciding criteria, what is unknown and what needs a person, each evidence item linked to
//! its resource when the FHIR server is known. Newly eligible patients come first.
//!
//! One renderer for both ways the page is made: `screen`/`sweep --format html` write it as a
//! file (`Writer`), and `serve` answers `GET /` with it from its board of latest verdicts.
//! Server-rendered and self-contained: plain inline style and script, nothing fetched, every
//! piece of text from the data escaped.

use crate::criteria::eval::TrialResult;
use crate::criteria::{Outcome, Status};
use crate::facts::Person;
use std::fmt::Write as _;

/// One criterion as a row shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PageItem {
    pub id: String,
    pub reason: String,
    pub evidence: Vec<String>,
}

/// What the page shows of one patient's result for one trial: small (reasons, not the
/// criteria's texts and facts), so that a page, or the service's board, can hold a whole run.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRow {
    pub patient: String,
    pub person: Option<Person>,
    pub trial: String,
    pub status: Status,
    /// The criteria that rule the patient out, and the record that does (deceased, merged).
    pub deciding: Vec<PageItem>,
    pub unknown: Vec<PageItem>,
    pub manual: Vec<PageItem>,
    /// Every resource any criterion cites, once.
    pub evidence: Vec<String>,
    /// The status before the latest change, when the page is told of one.
    pub previous: Option<Status>,
    /// When, in words for the reader (the screening date, when the status changed).
    pub when: Option<String>,
}

impl PageRow {
    pub fn of(r: &TrialResult) -> PageRow {
        let item = |c: &crate::criteria::eval::CriterionResult| PageItem {
            id: c.id.to_string(),
            reason: c.reason.clone(),
            evidence: dedup(c.evidence.iter().map(|e| e.resource.clone()).collect()),
        };
        let pick = |o: Outcome| r.criteria.iter().filter(|c| c.outcome == o).map(item).collect::<Vec<_>>();
        let deciding = r
            .criteria
            .iter()
            .filter(|c| r.decided_by.iter().any(|d| d.id == c.id))
            .map(item)
            .chain(r.record.iter().map(|rec| PageItem {
                id: "record".into(),
                reason: rec.clone(),
                evidence: Vec::new(),
            }))
            .collect();
        PageRow {
            patient: r.patient.clone(),
            person: r.person.clone(),
            trial: r.trial.clone(),
            status: r.status,
            deciding,
            unknown: pick(Outcome::Unknown),
            manual: pick(Outcome::Manual),
            evidence: dedup(
                r.criteria
                    .iter()
                    .flat_map(|c| c.evidence.iter().map(|e| e.resource.clone()))
                    .collect(),
            ),
            previous: None,
            when: None,
        }
    }

    /// How the status moved, if the page knows the one before.
    pub fn change(&self) -> Option<Change> {
        let was = self.previous.filter(|p| *p != self.status)?;
        Some(if candidate(self.status) && !candidate(was) {
            Change::NewlyEligible
        } else if self.status == Status::Ineligible && candidate(was) {
            Change::NewlyIneligible
        } else {
            Change::Other
        })
    }
}

/// The same reading of "newly" as a sweep's changes (`state::Changes`): a candidate now that
/// was not one, and ineligible now after being one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    NewlyEligible,
    NewlyIneligible,
    Other,
}

fn candidate(s: Status) -> bool {
    matches!(s, Status::Eligible | Status::PotentiallyEligible)
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

/// What a page is made of besides its rows.
pub struct PageView<'a> {
    /// The heading and the page's title.
    pub title: &'a str,
    /// A line under the heading, plain text.
    pub intro: &'a str,
    /// One section per trial, in this order.
    pub trials: &'a [String],
    pub rows: &'a [&'a PageRow],
    /// The FHIR server's base URL: evidence `Type/id` links to `{base}/Type/id`.
    pub link_base: Option<&'a str>,
    /// Who is signed in, on the served page.
    pub account: Option<&'a str>,
    /// Offer to sign out (a session of the served page; not a proxy's sign-in).
    pub sign_out: bool,
}

/// Where a row sorts within its trial: newly eligible first, then by status, the newly
/// ineligible before the ineligible.
fn rank(r: &PageRow) -> u8 {
    match (r.change(), r.status) {
        (Some(Change::NewlyEligible), Status::Eligible) => 0,
        (Some(Change::NewlyEligible), _) => 1,
        (_, Status::Eligible) => 2,
        (_, Status::PotentiallyEligible) => 3,
        (_, Status::Error) => 4,
        (Some(Change::NewlyIneligible), _) => 5,
        (_, Status::Ineligible) => 6,
    }
}

/// The filter a row answers to: the newly ineligible are shown by default, the others not.
fn filter_key(r: &PageRow) -> &'static str {
    match r.change() {
        Some(Change::NewlyIneligible) => "newly-ineligible",
        _ => r.status.as_str(),
    }
}

pub(crate) fn esc(s: &str) -> String {
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

/// `Type/id` with a FHIR resource type and id: the only references linked (a Bundle's
/// `urn:uuid:` fullUrl names no resource on the server).
fn linkable(reference: &str) -> bool {
    let Some((kind, id)) = reference.split_once('/') else {
        return false;
    };
    kind.len() > 1
        && kind.starts_with(|c: char| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphabetic())
        && (1..=64).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

fn evidence_link(e: &str, base: Option<&str>) -> String {
    match base.filter(|_| linkable(e)) {
        Some(b) => format!(
            "<a href=\"{}/{}\" target=\"_blank\" rel=\"noopener noreferrer\">{}</a>",
            esc(b),
            esc(e),
            esc(e)
        ),
        None => esc(e),
    }
}

/// Sorting and filtering, in plain script: no build step, nothing fetched.
const SCRIPT: &str = r#"
function filterRows() {
  const q = document.getElementById('q').value.toLowerCase();
  const shown = new Set([...document.querySelectorAll('input.status:checked')].map(b => b.value));
  document.querySelectorAll('tbody tr[data-filter]').forEach(tr => {
    tr.hidden = !(shown.has(tr.dataset.filter) && tr.textContent.toLowerCase().includes(q));
  });
}
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = c => c.dataset.key || c.textContent;
  [...body.rows].sort((a, b) => key(a.cells[i]).localeCompare(key(b.cells[i])) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
}
"#;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
header{display:flex;justify-content:space-between;align-items:baseline;gap:1rem}\
table{border-collapse:collapse;width:100%;margin-bottom:2rem;table-layout:fixed}th:nth-child(1){width:12%}th:nth-child(2){width:8%}th:nth-child(3){width:10%}th:nth-child(4){width:24%}th:nth-child(5){width:24%}th:nth-child(6){width:11%}th:nth-child(7){width:11%}td{overflow-wrap:anywhere}th,td{border:1px solid #ccc;padding:.3rem .5rem;vertical-align:top;text-align:left}\
th{background:#f3f3f3}th[onclick]{cursor:pointer}th[onclick]::after{content:' \\2195';color:#999}\
td.status b{font-weight:600}tr.eligible td.status b{color:#0a6d2c}tr.potentially-eligible td.status b{color:#8a5a00}\
tr.ineligible td.status b{color:#777}tr.error td.status b{color:#b00020}\
mark{padding:0 .25rem;border-radius:.2rem;font-size:.85em}mark.newly-eligible{background:#c8f2d4}mark.newly-ineligible{background:#f7d4d4}mark.changed{background:#eee}\
ul{margin:0;padding-left:1.1rem}small{color:#555}.ev,td.review,td.evidence{font-size:.85em}summary{cursor:pointer}";

/// The whole page.
pub fn page(v: &PageView) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\
         <style>{STYLE}</style><script>{SCRIPT}</script></head><body>\n<header><h1>{title}</h1>",
        title = esc(v.title)
    );
    if let Some(who) = v.account {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/logout\"><small>Signed in: {}</small>{}</form>",
            esc(who),
            if v.sign_out {
                " <button type=\"submit\">Sign out</button>"
            } else {
                ""
            }
        );
    }
    let _ = write!(
        out,
        "</header>\n<p>{}</p>\n<p><label>Find <input id=\"q\" type=\"search\" oninput=\"filterRows()\" \
         placeholder=\"name, MRN, criterion, reason\"></label> ",
        esc(v.intro)
    );
    for (value, label, on) in [
        ("eligible", "eligible", true),
        ("potentially-eligible", "potentially eligible", true),
        ("error", "error", true),
        ("newly-ineligible", "newly ineligible", true),
        ("ineligible", "ineligible", false),
    ] {
        let _ = write!(
            out,
            "<label><input type=\"checkbox\" class=\"status\" value=\"{value}\"{} onchange=\"filterRows()\"> {label}</label> ",
            if on { " checked" } else { "" }
        );
    }
    out.push_str("</p>\n");
    for trial in v.trials {
        let mut mine: Vec<&PageRow> = v.rows.iter().copied().filter(|r| &r.trial == trial).collect();
        let sort_name = |r: &PageRow| r.person.as_ref().and_then(|p| p.name.clone()).unwrap_or_default();
        mine.sort_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then_with(|| sort_name(a).cmp(&sort_name(b)))
                .then_with(|| a.patient.cmp(&b.patient))
        });
        let n = |s: Status| mine.iter().filter(|r| r.status == s).count();
        let new = mine.iter().filter(|r| r.change() == Some(Change::NewlyEligible)).count();
        let _ = writeln!(
            out,
            "<section id=\"trial-{id}\"><h2>{id}</h2><p>{} eligible, {} potentially eligible, {} ineligible, {} error{}</p>",
            n(Status::Eligible),
            n(Status::PotentiallyEligible),
            n(Status::Ineligible),
            n(Status::Error),
            if new > 0 {
                format!("; {new} newly eligible")
            } else {
                String::new()
            },
            id = esc(trial)
        );
        if mine.is_empty() {
            out.push_str("<p><small>No patient screened for this trial yet.</small></p></section>\n");
            continue;
        }
        out.push_str(
            "<table><thead><tr><th onclick=\"sortBy(this)\">Patient</th><th onclick=\"sortBy(this)\">MRN</th>\
             <th onclick=\"sortBy(this)\">Status</th><th>Deciding</th><th>Unknown</th><th>Needs review</th>\
             <th>Evidence</th></tr></thead><tbody>\n",
        );
        for r in mine {
            row(&mut out, r, v.link_base);
        }
        out.push_str("</tbody></table></section>\n");
    }
    out.push_str("</body></html>\n");
    out
}

fn row(out: &mut String, r: &PageRow, base: Option<&str>) {
    let items = |items: &[PageItem]| -> String {
        if items.is_empty() {
            return String::new();
        }
        let li: String = items
            .iter()
            .map(|i| {
                let ev: Vec<String> = i.evidence.iter().map(|e| evidence_link(e, base)).collect();
                let ev = if ev.is_empty() {
                    String::new()
                } else {
                    format!(" <span class=\"ev\">[{}]</span>", ev.join(", "))
                };
                format!("<li><b>{}</b> {}{ev}</li>", esc(&i.id), esc(&i.reason))
            })
            .collect();
        format!("<ul>{li}</ul>")
    };
    let name = r.person.as_ref().and_then(|p| p.name.as_deref());
    let mrn = r.person.as_ref().and_then(|p| p.mrn.as_deref()).unwrap_or("");
    let who = match name {
        Some(n) => format!("<b>{}</b><br><small>{}</small>", esc(n), esc(&r.patient)),
        None => esc(&r.patient),
    };
    let mut status = format!("<b>{}</b>", r.status.as_str().replace('-', " "));
    if let (Some(c), Some(was)) = (r.change(), r.previous) {
        let (class, label) = match c {
            Change::NewlyEligible => ("newly-eligible", "newly eligible"),
            Change::NewlyIneligible => ("newly-ineligible", "newly ineligible"),
            Change::Other => ("changed", "changed"),
        };
        let _ = write!(
            status,
            " <mark class=\"{class}\">{label}</mark><br><small>was {}</small>",
            was.as_str().replace('-', " ")
        );
    }
    if let Some(when) = &r.when {
        let _ = write!(status, "<br><small>{}</small>", esc(when));
    }
    // Needs review: the ids, each with its reason on hover, to keep rows short.
    let manual: Vec<String> = r
        .manual
        .iter()
        .map(|i| format!("<span title=\"{}\">{}</span>", esc(&i.reason), esc(&i.id)))
        .collect();
    // Every resource cited, folded: the deciding and unknown items show their own.
    let evidence = match r.evidence.len() {
        0 => String::new(),
        n => format!(
            "<details><summary>{n} resource{}</summary>{}</details>",
            if n == 1 { "" } else { "s" },
            r.evidence.iter().map(|e| evidence_link(e, base)).collect::<Vec<_>>().join(" ")
        ),
    };
    let (class, filter) = (r.status.as_str(), filter_key(r));
    let _ = writeln!(
        out,
        "<tr class=\"{class}\" data-status=\"{class}\" data-filter=\"{filter}\"{hidden}>\
         <td data-key=\"{name_key}\">{who}</td><td>{mrn}</td><td class=\"status\" data-key=\"{rank}\">{status}</td>\
         <td>{}</td><td>{}</td><td class=\"review\">{}</td><td class=\"evidence\">{evidence}</td></tr>",
        items(&r.deciding),
        items(&r.unknown),
        manual.join(", "),
        hidden = if filter == "ineligible" { " hidden" } else { "" },
        name_key = esc(name.unwrap_or(&r.patient)),
        mrn = esc(mrn),
        rank = rank(r),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(patient: &str, status: Status, previous: Option<Status>) -> PageRow {
        PageRow {
            patient: patient.into(),
            person: Some(Person {
                name: Some(format!("<{patient}>")),
                mrn: Some("MR&1".into()),
            }),
            trial: "T1".into(),
            status,
            deciding: vec![PageItem {
                id: "exc-1".into(),
                reason: "egfr 38 ≤ 45 mL/min/{1.73_m2}".into(),
                evidence: vec!["Observation/o-1".into(), "urn:uuid:abc".into()],
            }],
            unknown: Vec::new(),
            manual: Vec::new(),
            evidence: vec!["Observation/o-1".into()],
            previous,
            when: None,
        }
    }

    #[test]
    fn page_text_is_escaped() {
        assert_eq!(
            esc("UPCR <0.2 & \"x\" 'y' >1"),
            "UPCR &lt;0.2 &amp; &quot;x&quot; &#39;y&#39; &gt;1"
        );
    }

    #[test]
    fn newly_eligible_first_and_the_newly_ineligible_shown() {
        let rows = [
            row("Patient/a", Status::PotentiallyEligible, None),
            row("Patient/b", Status::Ineligible, Some(Status::PotentiallyEligible)),
            row("Patient/c", Status::PotentiallyEligible, Some(Status::Ineligible)),
            row("Patient/d", Status::Ineligible, None),
        ];
        let refs: Vec<&PageRow> = rows.iter().collect();
        let html = page(&PageView {
            title: "t",
            intro: "i",
            trials: &["T1".to_string(), "T2".to_string()],
            rows: &refs,
            link_base: Some("https://fhir.example/r4"),
            account: Some("j.cobb"),
            sign_out: true,
        });
        let at = |p: &str| html.find(&format!("<small>{p}</small>")).unwrap();
        assert!(at("Patient/c") < at("Patient/a"), "newly eligible first");
        assert!(at("Patient/a") < at("Patient/b") && at("Patient/b") < at("Patient/d"));
        assert!(html.contains("<mark class=\"newly-eligible\">newly eligible</mark><br><small>was ineligible</small>"));
        assert!(html.contains("data-filter=\"newly-ineligible\">"), "shown by default");
        assert!(html.contains("data-filter=\"ineligible\" hidden>"));
        // Names and MRNs are escaped; a Type/id is linked, a urn:uuid is not.
        assert!(html.contains("<b>&lt;Patient/a&gt;</b>") && html.contains("<td>MR&amp;1</td>"));
        assert!(html.contains("<a href=\"https://fhir.example/r4/Observation/o-1\""));
        assert!(html.contains(", urn:uuid:abc]"));
        assert!(html.contains("No patient screened for this trial yet."));
        assert!(html.contains("Signed in: j.cobb"));
    }

    #[test]
    fn only_resource_references_are_links() {
        assert!(linkable("Observation/rosa-egfr-20260505"));
        assert!(!linkable("urn:uuid:8c5d4e1a-3f7b"));
        assert!(!linkable("Observation/../../x"));
        assert!(!linkable("Observation/a b"));
        assert!(!linkable("javascript:alert(1)/x"));
    }
}
