//! Terminology and unit bindings, loaded from `mappings/*.yaml`.
//!
//! Mappings are data so that a site can add a local lab code, a unit string its LIS sends or a
//! whole drug without a rebuild. They are compiled once at load into hash lookups; every name
//! a trial refers to is checked against them then, so a typo fails `trialgate check`, not a
//! screening run.

use crate::config::{ConfigError, Located, read_yaml, yaml_files};
use jsonpath_rust::parser::model::JpQuery;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How a unit converts to its lab's canonical unit. A plain number multiplies; `divide`
/// exists because some conversions are defined as divisions (`/uL` to `10*9/L` is ÷ 1000)
/// and dividing gives the exact IEEE result that reference implementations compare against.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Factor {
    Multiply(f64),
    Divide { divide: f64 },
}

impl Factor {
    pub fn apply(self, v: f64) -> f64 {
        match self {
            // Multiplying by 1.0 is exact in IEEE arithmetic: no special case needed.
            Factor::Multiply(f) => v * f,
            Factor::Divide { divide } => v / divide,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UlnSpec {
    /// Upper limit of normal used when an Observation carries no usable `referenceRange.high`.
    pub default: f64,
    pub unit: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    pub description: String,
    /// The canonical unit every accepted unit converts to.
    pub unit: String,
    pub codes: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub units: BTreeMap<String, Factor>,
    /// Which codes report which equation (eGFR): `ckd-epi-2021: [98979-8]`.
    #[serde(default)]
    pub equations: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub uln: Option<UlnSpec>,
    /// Set on labs where a high value is the healthy one (eGFR): `check` flags an inclusion
    /// with an upper bound or an exclusion with a lower bound on them as suspect.
    #[serde(default)]
    pub higher_is_healthier: bool,
    /// Qualitative results: coded answers (any system) and strings that mean each result.
    #[serde(default)]
    pub results: BTreeMap<String, Vec<String>>,
    /// A JSONPath to the numeric value, for feeds that put it where the common shapes do not.
    #[serde(default)]
    pub value_path: Option<String>,
    /// Panels whose components carry this lab (the blood-pressure panel): a sweep that asks
    /// the server for Observations by code must ask for these too, since a `code` search
    /// does not look into components.
    #[serde(default)]
    pub panels: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSpec {
    pub description: String,
    /// Codes by system key. A code may be exact (`M32.14`), a prefix (`M32*`) or a range of
    /// categories (`C00-C96`).
    #[serde(default)]
    pub codes: BTreeMap<String, Vec<String>>,
    /// Codes that never belong to the set even when a pattern above matches them.
    #[serde(default)]
    pub exclude: BTreeMap<String, Vec<String>>,
    /// Other sets whose members belong to this one.
    #[serde(default)]
    pub include: Vec<String>,
    /// Case-insensitive texts (used for routes, which feeds often send as text only).
    #[serde(default)]
    pub text: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductSpec {
    pub name: String,
    pub ingredients: Vec<String>,
    #[serde(default)]
    pub route: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BiopsySpec {
    pub procedures: String,
    pub reports: String,
    pub classes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveSpec {
    pub from: Vec<String>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    #[serde(default)]
    systems: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    unit_aliases: BTreeMap<String, String>,
    #[serde(default)]
    labs: BTreeMap<String, Located<LabSpec>>,
    #[serde(default)]
    sets: BTreeMap<String, Located<SetSpec>>,
    #[serde(default)]
    rxnorm_products: BTreeMap<String, ProductSpec>,
    #[serde(default)]
    dose_units: BTreeMap<String, Factor>,
    #[serde(default)]
    biopsies: BTreeMap<String, BiopsySpec>,
    #[serde(default)]
    derived: BTreeMap<String, DeriveSpec>,
}

#[derive(Debug, Clone)]
enum Pattern {
    Prefix(String),
    /// ICD-10 categories: `C00-C96` compares the first three characters.
    Range(String, String),
    /// Numeric codes of equal length (CPT `90951-90970`).
    NumRange(String, String),
}

#[derive(Debug, Default, Clone)]
struct SystemCodes {
    exact: HashMap<String, Vec<usize>, Quick>,
    patterns: Vec<(Pattern, usize)>,
}

impl SystemCodes {
    /// Whether (normalized) `code` names set `i` here.
    fn holds(&self, code: &str, i: usize) -> bool {
        self.exact.get(code).is_some_and(|v| v.contains(&i)) || self.patterns.iter().any(|(p, j)| *j == i && p.matches(code))
    }
}

/// A compiled lab: its spec plus the per-code equation lookup.
#[derive(Debug)]
pub struct Lab {
    pub name: String,
    pub spec: LabSpec,
    pub file: PathBuf,
    pub equation_of: HashMap<String, String>,
    pub value_path: Option<JpQuery>,
}

#[derive(Debug)]
pub struct Set {
    pub name: String,
    pub spec: SetSpec,
    pub file: PathBuf,
}

type Quick = std::hash::BuildHasherDefault<super::store::Words>;

/// All mapping files, merged and compiled.
#[derive(Debug, Default)]
pub struct Mappings {
    pub files: Vec<PathBuf>,
    /// Looked up for every coding read: a fast hasher (the keys come from the mapping files).
    system_keys: HashMap<String, String, Quick>,
    unit_aliases: HashMap<String, String>,
    pub labs: Vec<Lab>,
    lab_by_name: HashMap<String, usize>,
    /// The lab of each code, by system key then code: looked up with borrowed strings.
    lab_codes_by: HashMap<String, HashMap<String, usize, Quick>, Quick>,
    pub sets: Vec<Set>,
    set_by_name: HashMap<String, usize>,
    set_codes: HashMap<String, SystemCodes, Quick>,
    set_excludes: HashMap<String, SystemCodes, Quick>,
    set_texts: HashMap<String, Vec<usize>>,
    pub products: HashMap<String, ProductSpec>,
    pub dose_units: HashMap<String, Factor>,
    pub biopsies: BTreeMap<String, BiopsySpec>,
    pub derived: BTreeMap<String, DeriveSpec>,
    /// Sets that include other sets, expanded: set -> every set it is part of.
    parents: Vec<Vec<usize>>,
}

/// A code as read from a resource, with its system resolved to a mapping key (`loinc`,
/// `snomed`, `icd10`...) or left as the raw URI when no mapping names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SystemCode {
    pub system: String,
    pub code: String,
}

impl Mappings {
    /// Loads every `*.yaml` file in `dir` (sorted), merging them; a name defined twice is an error.
    pub fn load_dir(dir: &Path) -> Result<Mappings, ConfigError> {
        let paths = yaml_files(dir)?;
        if paths.is_empty() {
            return Err(ConfigError::at(dir, None, "no mapping files (*.yaml) in this folder".into()));
        }
        Self::load_files(&paths)
    }

    pub fn load_files(paths: &[PathBuf]) -> Result<Mappings, ConfigError> {
        let mut m = Mappings::default();
        let mut errors = Vec::new();
        let mut set_specs: Vec<(String, Located<SetSpec>, PathBuf)> = Vec::new();
        for path in paths {
            let file: MappingFile = read_yaml(path)?;
            m.files.push(path.clone());
            for (key, uris) in file.systems {
                for uri in uris {
                    m.system_keys.insert(uri, key.clone());
                }
                m.system_keys.insert(key.clone(), key);
            }
            m.unit_aliases.extend(file.unit_aliases);
            for (name, spec) in file.labs {
                if m.lab_by_name.contains_key(&name) {
                    errors.push(ConfigError::at(path, spec.line, format!("lab `{name}` is defined twice")));
                    continue;
                }
                m.lab_by_name.insert(name.clone(), m.labs.len());
                let value_path = match &spec.value.value_path {
                    Some(p) => match jsonpath_rust::parser::parse_json_path(p) {
                        Ok(q) => Some(q),
                        Err(e) => {
                            errors.push(ConfigError::at(
                                path,
                                spec.line,
                                format!("lab `{name}`: value_path `{p}` is not valid JSONPath: {e}"),
                            ));
                            None
                        }
                    },
                    None => None,
                };
                let mut equation_of = HashMap::new();
                for (eq, codes) in &spec.value.equations {
                    for c in codes {
                        equation_of.insert(c.clone(), eq.clone());
                    }
                }
                m.labs.push(Lab {
                    name,
                    spec: spec.value,
                    file: path.clone(),
                    equation_of,
                    value_path,
                });
            }
            for (name, spec) in file.sets {
                set_specs.push((name, spec, path.clone()));
            }
            m.products.extend(file.rxnorm_products);
            m.dose_units.extend(file.dose_units);
            for (k, v) in file.biopsies {
                m.biopsies.insert(k, v);
            }
            m.derived.extend(file.derived);
        }
        for (name, spec, path) in set_specs {
            if m.set_by_name.contains_key(&name) {
                errors.push(ConfigError::at(&path, spec.line, format!("set `{name}` is defined twice")));
                continue;
            }
            m.set_by_name.insert(name.clone(), m.sets.len());
            m.sets.push(Set {
                name,
                spec: spec.value,
                file: path,
            });
        }
        // Lab codes, with system keys checked.
        for (i, lab) in m.labs.iter().enumerate() {
            for sys in lab.spec.panels.keys().filter(|s| !m.system_keys.contains_key(*s)) {
                errors.push(ConfigError::at(
                    &lab.file,
                    None,
                    format!("lab `{}`: panels: unknown code system `{sys}`; add it under `systems:`", lab.name),
                ));
            }
            for (sys, codes) in &lab.spec.codes {
                if !m.system_keys.contains_key(sys) {
                    errors.push(ConfigError::at(
                        &lab.file,
                        None,
                        format!("lab `{}`: unknown code system `{sys}`; add it under `systems:`", lab.name),
                    ));
                }
                for c in codes {
                    if let Some(prev) = m.lab_codes_by.entry(sys.clone()).or_default().insert(c.clone(), i) {
                        if prev != i {
                            errors.push(ConfigError::at(
                                &lab.file,
                                None,
                                format!("code {sys}|{c} is mapped to both `{}` and `{}`", m.labs[prev].name, lab.name),
                            ));
                        }
                    }
                }
            }
            if !lab.spec.units.is_empty() && !lab.spec.units.contains_key(&lab.spec.unit) {
                errors.push(ConfigError::at(
                    &lab.file,
                    None,
                    format!(
                        "lab `{}`: its canonical unit `{}` must be listed under `units` (with factor 1)",
                        lab.name, lab.spec.unit
                    ),
                ));
            }
        }
        // Set codes.
        let n = m.sets.len();
        m.parents = vec![Vec::new(); n];
        for i in 0..n {
            let (codes, excludes, texts, includes, file, name) = {
                let s = &m.sets[i];
                (
                    s.spec.codes.clone(),
                    s.spec.exclude.clone(),
                    s.spec.text.clone(),
                    s.spec.include.clone(),
                    s.file.clone(),
                    s.name.clone(),
                )
            };
            for (sys, list) in codes {
                if !m.system_keys.contains_key(&sys) {
                    errors.push(ConfigError::at(
                        &file,
                        None,
                        format!("set `{name}`: unknown code system `{sys}`; add it under `systems:`"),
                    ));
                }
                let entry = m.set_codes.entry(sys.clone()).or_default();
                for c in list {
                    add_code(entry, &sys, &c, i);
                }
            }
            for (sys, list) in excludes {
                let entry = m.set_excludes.entry(sys.clone()).or_default();
                for c in list {
                    add_code(entry, &sys, &c, i);
                }
            }
            for t in texts {
                m.set_texts.entry(t.to_lowercase()).or_default().push(i);
            }
            for inc in includes {
                match m.set_by_name.get(&inc) {
                    Some(&j) => m.parents[j].push(i),
                    None => errors.push(ConfigError::at(&file, None, format!("set `{name}` includes unknown set `{inc}`"))),
                }
            }
        }
        for (name, b) in &m.biopsies {
            for s in std::iter::once(&b.procedures)
                .chain(std::iter::once(&b.reports))
                .chain(b.classes.values())
            {
                if !m.set_by_name.contains_key(s) {
                    errors.push(ConfigError::at(
                        Path::new("mappings"),
                        None,
                        format!("biopsy `{name}` refers to unknown set `{s}`"),
                    ));
                }
            }
        }
        for (name, d) in &m.derived {
            if !m.lab_by_name.contains_key(name) {
                errors.push(ConfigError::at(
                    Path::new("mappings"),
                    None,
                    format!("derived `{name}` is not a lab"),
                ));
            }
            for f in &d.from {
                if !m.lab_by_name.contains_key(f) {
                    errors.push(ConfigError::at(
                        Path::new("mappings"),
                        None,
                        format!("derived `{name}` uses unknown lab `{f}`"),
                    ));
                }
            }
        }
        if errors.is_empty() { Ok(m) } else { Err(ConfigError::Many(errors)) }
    }

    pub fn lab(&self, name: &str) -> Option<usize> {
        self.lab_by_name.get(name).copied()
    }

    pub fn set(&self, name: &str) -> Option<usize> {
        self.set_by_name.get(name).copied()
    }

    /// The mapping key for a code system URI (`urn:oid:2.16.840.1.113883.6.1` -> `loinc`), or
    /// the trimmed URI itself when it has none.
    pub fn system_key_str<'a>(&'a self, uri: Option<&'a str>) -> &'a str {
        let uri = crate::fhir::trim(uri.unwrap_or(""));
        self.system_keys.get(uri).map(String::as_str).unwrap_or(uri)
    }

    /// The lab a code names, by its system key and its code (trimmed).
    pub fn lab_for_str(&self, system_key: &str, code: &str) -> Option<usize> {
        self.lab_codes_by.get(system_key)?.get(code).copied()
    }

    pub fn known_system(&self, key: &str) -> bool {
        self.system_keys.contains_key(key)
    }

    /// Resolves a unit string through the alias table (`K/uL` -> `10*3/uL`).
    pub fn unit_alias(&self, unit: &str) -> Option<&str> {
        self.unit_aliases.get(crate::fhir::trim(unit)).map(String::as_str)
    }

    /// The factor converting `unit` to lab `lab`'s canonical unit, trying the alias table.
    pub fn lab_factor(&self, lab: usize, unit: &str) -> Option<Factor> {
        let units = &self.labs[lab].spec.units;
        units.get(unit).or_else(|| units.get(self.unit_alias(unit)?)).copied()
    }

    pub fn dose_factor(&self, unit: &str) -> Option<Factor> {
        self.dose_units
            .get(unit)
            .or_else(|| self.dose_units.get(self.unit_alias(unit)?))
            .copied()
    }

    /// Every set `code` belongs to (including the sets that include those sets).
    pub fn sets_of(&self, sc: &SystemCode, out: &mut Vec<usize>) {
        self.sets_of_str(&sc.system, &sc.code, out);
    }

    /// [`Mappings::sets_of`] for a system key and code as borrowed. Allocates nothing for a
    /// code that needs no normalizing: it runs for every coded record of a cohort.
    pub fn sets_of_str(&self, system: &str, code: &str, out: &mut Vec<usize>) {
        let Some(sys) = self.set_codes.get(system) else { return };
        let norm = normalize_code(system, code);
        let excludes = self.set_excludes.get(system);
        let direct = sys.exact.get(norm.as_ref()).map(Vec::as_slice).unwrap_or_default();
        let matched = sys.patterns.iter().filter(|(p, _)| p.matches(&norm)).map(|(_, i)| *i);
        for i in direct.iter().copied().chain(matched) {
            if !excludes.is_some_and(|ex| ex.holds(&norm, i)) {
                self.push_with_parents(i, out);
            }
        }
    }

    pub fn sets_of_text(&self, text: &str, out: &mut Vec<usize>) {
        if let Some(v) = self.set_texts.get(&text.trim().to_lowercase()) {
            for &i in v {
                self.push_with_parents(i, out);
            }
        }
    }

    fn push_with_parents(&self, i: usize, out: &mut Vec<usize>) {
        if out.contains(&i) {
            return;
        }
        out.push(i);
        for &p in &self.parents[i] {
            self.push_with_parents(p, out);
        }
    }

    /// Ingredient codes for an RxNorm product code (SCD/SBD), from the shipped roll-up table.
    pub fn product(&self, code: &str) -> Option<&ProductSpec> {
        self.products.get(code)
    }
}

/// ICD-10 codes arrive with and without the dot (`M32.14`, `M3214`): compare them without it.
fn normalize_code<'a>(system: &str, code: &'a str) -> std::borrow::Cow<'a, str> {
    let code = crate::fhir::trim(code);
    if system == "icd10" && code.bytes().any(|b| b == b'.' || b.is_ascii_lowercase()) {
        code.replace('.', "").to_ascii_uppercase().into()
    } else {
        code.into()
    }
}

fn add_code(entry: &mut SystemCodes, system: &str, c: &str, set: usize) {
    let norm = |s: &str| normalize_code(system, s).into_owned();
    if let Some(prefix) = c.strip_suffix('*') {
        entry.patterns.push((Pattern::Prefix(norm(prefix)), set));
    } else if let Some((a, b)) = c.split_once('-').filter(|(a, b)| is_icd_category(a) && is_icd_category(b)) {
        entry.patterns.push((Pattern::Range(norm(a), norm(b)), set));
    } else if let Some((a, b)) = c
        .split_once('-')
        .filter(|(a, b)| a.len() == b.len() && [a, b].iter().all(|s| s.bytes().all(|c| c.is_ascii_digit())))
    {
        entry.patterns.push((Pattern::NumRange(a.to_string(), b.to_string()), set));
    } else {
        entry.exact.entry(norm(c)).or_default().push(set);
    }
}

/// `C00`, `D47.Z1`-like: a letter then two digits (ICD-10 category) for range syntax.
fn is_icd_category(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1].is_ascii_digit() && b[2].is_ascii_alphanumeric()
}

impl Pattern {
    fn matches(&self, code: &str) -> bool {
        match self {
            Pattern::Prefix(p) => code.starts_with(p.as_str()),
            Pattern::NumRange(a, b) => code.len() == a.len() && code >= a.as_str() && code <= b.as_str(),
            Pattern::Range(a, b) => {
                // Compare on the category (first three characters) so that C96 includes C96.Z.
                // `get` rather than slicing: a code from the data may hold multi-byte characters.
                match (code.get(..3), a.get(..3), b.get(..3)) {
                    (Some(cat), Some(lo), Some(hi)) => cat >= lo && cat <= hi,
                    _ => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(entries: &[&str]) -> SystemCodes {
        let mut s = SystemCodes::default();
        for c in entries {
            add_code(&mut s, "icd10", c, 0);
        }
        s
    }

    #[test]
    fn icd_ranges_prefixes_and_dots() {
        let s = codes(&["C00-C96", "M32*", "Z99.2"]);
        let hit = |c: &str| {
            let n = normalize_code("icd10", c);
            s.exact.contains_key(n.as_ref()) || s.patterns.iter().any(|(p, _)| p.matches(&n))
        };
        assert!(hit("C50.911"));
        assert!(hit("C96.Z"));
        assert!(!hit("D03.9"));
        assert!(hit("M32.14"));
        assert!(hit("M3214"));
        assert!(hit("z99.2"));
        assert!(!hit("M35.00"));
        assert!(!hit("Ü1"), "multi-byte characters in a code are compared, not sliced");
        assert!(!hit("CCÜ"), "a character across the third byte");
    }

    #[test]
    fn factors_divide_exactly() {
        assert_eq!(Factor::Divide { divide: 1000.0 }.apply(50_000.0), 50.0);
        assert_eq!(Factor::Multiply(1.0).apply(1.5), 1.5);
    }
}
