//! FHIR R4 JSON from files and folders: a Bundle (collection, searchset, transaction, batch,
//! or any other type), a single resource, or NDJSON with one resource per line as Bulk Data
//! writes it. A malformed line, entry or resource is reported with its file and line (or entry
//! index) and skipped; it never stops the other resources from being read.

use super::model::*;
use super::{InputIssue, READ_TYPES, Resource};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// A resource as read, with the `fullUrl` its Bundle entry gave it (used to resolve
/// `urn:uuid:` references in Synthea-style bundles that carry no ids).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub resource: Resource,
    pub full_url: Option<String>,
}

#[derive(Debug, Default)]
pub struct ReadOutput {
    pub resources: Vec<Parsed>,
    pub issues: Vec<InputIssue>,
    /// Files read, in the order read.
    pub files: Vec<PathBuf>,
    /// Resources of types no criterion needs, skipped unparsed.
    pub skipped: usize,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Keep each Observation's JSON text, for mappings that read a field through JSONPath.
    pub keep_observation_json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: no .json or .ndjson files found")]
    Empty(PathBuf),
}

/// Reads every FHIR file under `path` (a file, or a folder searched recursively for
/// `.json`, `.ndjson` and `.jsonl` files, in sorted order so runs are reproducible).
pub fn read_path(path: &Path, opts: ReadOptions) -> Result<ReadOutput, ReadError> {
    let mut files = Vec::new();
    collect_files(path, &mut files, &mut HashSet::new())?;
    if files.is_empty() {
        return Err(ReadError::Empty(path.to_path_buf()));
    }
    let mut out = ReadOutput::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| ReadError::Io { path: f.clone(), source })?;
        // Windows tools often write a UTF-8 byte-order mark, which JSON parsers reject.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        read_text(&f.display().to_string(), text, is_ndjson_name(&f), opts, &mut out);
        out.files.push(f);
    }
    Ok(out)
}

/// Every FHIR file under `path`, as [`read_path`] would read them.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    collect_files(path, &mut files, &mut HashSet::new())?;
    if files.is_empty() {
        return Err(ReadError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

/// The resource type of the first line of an NDJSON file (Bulk Data writes one type per
/// file), read without loading the file; None when it cannot tell.
pub fn first_type(path: &Path) -> Option<String> {
    use std::io::{BufRead, Read};
    let f = std::fs::File::open(path).ok()?;
    let mut first = String::new();
    // A Patient line is short; 1 MB bounds the read for a file whose first line is not.
    std::io::BufReader::new(f.take(1 << 20)).read_line(&mut first).ok()?;
    let line = first.trim_start_matches('\u{feff}').trim();
    resource_type(serde_json::from_str::<&RawValue>(line).ok()?)
}

/// `seen` holds canonical paths: a folder reached twice through symbolic links (or a link
/// loop) is read once, so no resource is counted twice.
fn collect_files(path: &Path, files: &mut Vec<PathBuf>, seen: &mut HashSet<PathBuf>) -> Result<(), ReadError> {
    let io = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !seen.insert(std::fs::canonicalize(path).map_err(io)?) {
        return Ok(());
    }
    if meta.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() || matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "ndjson" | "jsonl")) {
            collect_files(&p, files, seen)?;
        }
    }
    Ok(())
}

pub fn is_ndjson_name(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("ndjson" | "jsonl"))
}

/// Reads one file's text. `name` labels issues. A `.json` file that turns out to hold one
/// resource per line is read as NDJSON.
pub fn read_text(name: &str, text: &str, ndjson: bool, opts: ReadOptions, out: &mut ReadOutput) {
    if !ndjson {
        match serde_json::from_str::<&RawValue>(text) {
            Ok(raw) => {
                read_value(name, text, raw, None, opts, out);
                return;
            }
            Err(e) if e.line() > 1 && first_line_is_object(text) => {} // NDJSON saved as .json
            Err(e) => {
                out.issues
                    .push(issue(format!("{name}:{}:{}", e.line(), e.column()), format!("not valid JSON: {e}")));
                return;
            }
        }
    }
    for (i, line) in text.lines().enumerate() {
        read_line(&|| format!("{name}:{}", i + 1), line, opts, out);
    }
}

/// Reads one NDJSON line; `loc` names it, and is worked out only when there is a problem.
pub fn read_line(loc: &dyn Fn() -> String, line: &str, opts: ReadOptions, out: &mut ReadOutput) {
    let line = line.trim();
    if line.is_empty() {
        return;
    }
    // The common case, a resource whose resourceType comes first (as every serializer writes
    // it), is parsed once, straight into its type; only a problem takes the longer way below,
    // which tells broken JSON from a resource of the wrong shape.
    if !opts.keep_observation_json {
        if let Some(rt) = leading_type(line).filter(|t| *t != "Bundle") {
            if !READ_TYPES.contains(&rt) {
                out.skipped += 1;
                return;
            }
            if let Ok(resource) = parse_typed(rt, line, None) {
                out.resources.push(Parsed { resource, full_url: None });
                return;
            }
        }
    }
    match serde_json::from_str::<&RawValue>(line) {
        // A line may hold a whole Bundle.
        Ok(raw) if resource_type(raw).as_deref() == Some("Bundle") => read_value(&loc(), line, raw, None, opts, out),
        Ok(raw) => parse_resource(loc, raw, None, opts, out),
        Err(e) => out.issues.push(issue(loc(), format!("not valid JSON: {e}"))),
    }
}

fn first_line_is_object(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| serde_json::from_str::<&RawValue>(l.trim()).is_ok())
}

#[derive(Deserialize)]
struct BundleShape<'a> {
    #[serde(borrow, default)]
    entry: Vec<EntryShape<'a>>,
}

#[derive(Deserialize)]
struct EntryShape<'a> {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
}

fn read_value(name: &str, text: &str, raw: &RawValue, full_url: Option<String>, opts: ReadOptions, out: &mut ReadOutput) {
    // The line is worked out only when something must be reported: counting lines for every
    // entry made large Bundles quadratic.
    let loc = || format!("{name}:{}", line_of(text, raw));
    if resource_type(raw).as_deref() != Some("Bundle") {
        parse_resource(&loc, raw, full_url, opts, out);
        return;
    }
    let bundle: BundleShape = match serde_json::from_str(raw.get()) {
        Ok(b) => b,
        Err(e) => {
            out.issues.push(issue(loc(), format!("Bundle cannot be read: {e}")));
            return;
        }
    };
    for (i, entry) in bundle.entry.into_iter().enumerate() {
        // Entries without a resource (a transaction's DELETE, a search outcome) carry no data.
        if let Some(r) = entry.resource {
            read_value(&format!("{name} entry {i}"), text, r, entry.full_url, opts, out);
        }
    }
}

/// 1-based line of `raw` inside `text` (both borrowed from the same buffer).
fn line_of(text: &str, raw: &RawValue) -> usize {
    let off = (raw.get().as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    if off > text.len() {
        return 1;
    }
    text.as_bytes()[..off].iter().filter(|&&b| b == b'\n').count() + 1
}

fn issue(location: String, message: String) -> InputIssue {
    InputIssue { location, message }
}

/// The `resourceType` of a JSON object text when it is the first key.
fn leading_type(s: &str) -> Option<&str> {
    let rest = s.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix("\"resourceType\"")?;
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// The `resourceType` of a JSON object, found cheaply when it is the first key (as every
/// FHIR serializer writes it) and by a full scan otherwise.
fn resource_type(raw: &RawValue) -> Option<String> {
    if let Some(t) = leading_type(raw.get()) {
        return Some(t.to_string());
    }
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "resourceType")]
        rt: Option<String>,
    }
    serde_json::from_str::<Peek>(raw.get()).ok().and_then(|p| p.rt)
}

/// Parses a resource of a type in `READ_TYPES` from its JSON text.
fn parse_typed(rt: &str, text: &str, keep: Option<Box<RawValue>>) -> serde_json::Result<Resource> {
    match rt {
        "Patient" => serde_json::from_str(text).map(Resource::Patient),
        "Observation" => serde_json::from_str(text).map(|o| Resource::Observation(Box::new(o), keep)),
        "Condition" => serde_json::from_str(text).map(|r| Resource::Condition(Box::new(r))),
        "MedicationRequest" => serde_json::from_str(text).map(|r| Resource::MedicationRequest(Box::new(r))),
        "MedicationStatement" => serde_json::from_str(text).map(|r| Resource::MedicationStatement(Box::new(r))),
        "MedicationAdministration" => serde_json::from_str(text).map(|r| Resource::MedicationAdministration(Box::new(r))),
        "Medication" => serde_json::from_str::<Medication>(text).map(|r| Resource::Medication(Box::new(r))),
        "Procedure" => serde_json::from_str(text).map(|r| Resource::Procedure(Box::new(r))),
        "Immunization" => serde_json::from_str(text).map(|r| Resource::Immunization(Box::new(r))),
        "AllergyIntolerance" => serde_json::from_str(text).map(|r| Resource::AllergyIntolerance(Box::new(r))),
        "DiagnosticReport" => serde_json::from_str(text).map(|r| Resource::DiagnosticReport(Box::new(r))),
        // Callers check READ_TYPES first; a type outside it is no resource to read.
        _ => Err(serde::de::Error::custom(format!("{rt} is not read"))),
    }
}

fn parse_resource(loc: &dyn Fn() -> String, raw: &RawValue, full_url: Option<String>, opts: ReadOptions, out: &mut ReadOutput) {
    let Some(rt) = resource_type(raw) else {
        out.issues.push(issue(loc(), "not a FHIR resource: no resourceType".into()));
        return;
    };
    if !READ_TYPES.contains(&rt.as_str()) {
        out.skipped += 1;
        return;
    }
    let keep = (opts.keep_observation_json && rt == "Observation").then(|| raw.to_owned());
    match parse_typed(&rt, raw.get(), keep) {
        Ok(resource) => out.resources.push(Parsed { resource, full_url }),
        Err(e) => out
            .issues
            .push(issue(loc(), format!("{rt} skipped: {e} (line {} of the resource)", e.line()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, ndjson: bool) -> ReadOutput {
        let mut out = ReadOutput::default();
        read_text("t.json", text, ndjson, ReadOptions::default(), &mut out);
        out
    }

    #[test]
    fn malformed_ndjson_line_is_reported_and_others_kept() {
        let out = read(
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{not json\n{\"resourceType\":\"Patient\",\"id\":\"b\"}\n",
            true,
        );
        assert_eq!(out.resources.len(), 2);
        assert_eq!(out.issues.len(), 1);
        assert_eq!(out.issues[0].location, "t.json:2");
    }

    #[test]
    fn bundle_entry_with_wrong_type_is_reported_by_index_and_line() {
        let text = "{\"resourceType\":\"Bundle\",\"type\":\"collection\",\"entry\":[\n\
            {\"resource\":{\"resourceType\":\"Patient\",\"id\":\"a\"}},\n\
            {\"resource\":{\"resourceType\":\"Observation\",\"status\":7}},\n\
            {\"resource\":{\"resourceType\":\"Encounter\",\"id\":\"e\"}}]}";
        let out = read(text, false);
        assert_eq!(out.resources.len(), 1);
        assert_eq!(out.skipped, 1);
        assert_eq!(out.issues.len(), 1);
        assert_eq!(out.issues[0].location, "t.json entry 1:3");
        assert!(out.issues[0].message.starts_with("Observation skipped"));
    }

    #[test]
    fn ndjson_saved_as_json_is_read_line_by_line() {
        let out = read(
            "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Patient\",\"id\":\"b\"}\n",
            false,
        );
        assert_eq!(out.resources.len(), 2);
        assert!(out.issues.is_empty());
    }

    #[test]
    fn resource_type_not_first_is_still_found() {
        let out = read("{\"id\":\"a\",\"resourceType\":\"Patient\"}", false);
        assert_eq!(out.resources.len(), 1);
    }
}
