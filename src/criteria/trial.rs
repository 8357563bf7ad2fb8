//! Trial files (`config/trials/*.yaml`): each criterion of a listing, in the listing's order,
//! with its verbatim text and either a rule or the reason it needs a person.
//!
//! Rules are small YAML maps with exactly one "kind" key (`lab`, `condition`, `medication`,
//! `procedure`, `immunization`, `allergy`, `biopsy`, `age`, `sex`, `manual`, or the
//! combinators `all`, `any`, `not`) and the parameters of that kind. Loading compiles them:
//! fact and set names are resolved against the mappings, thresholds are converted to the lab's
//! canonical unit, windows are parsed, and anything wrong is reported with the file, the
//! criterion id and line, and what to do.

use super::Kind;
use crate::config::{ConfigError, Located, read_yaml};
use crate::facts::mappings::Mappings;
use crate::time::Span;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnitPolicy {
    /// The latest value in an unconvertible unit makes the fact unknown, naming the unit.
    #[default]
    Unknown,
    /// Values in unconvertible units are skipped as if absent (an older valid one may decide).
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NoRecords {
    /// A patient with no records of the kind at all (no Condition, no medication...) is unknown.
    #[default]
    Unknown,
    /// The feed is taken as complete: no records means the criterion is not met.
    NotMet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MissingStatus {
    /// A Condition without `clinicalStatus` (allowed for encounter diagnoses) leaves "is it
    /// active now?" unknown.
    #[default]
    Unknown,
    /// A Condition without `clinicalStatus` counts as active unless it has abated.
    Active,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default)]
    pub missing_clinical_status: MissingStatus,
    #[serde(default)]
    pub unconvertible_units: UnitPolicy,
    #[serde(default)]
    pub no_records: NoRecords,
    /// Window for labs whose rule gives none ("at screening"): 90 days unless set.
    #[serde(default)]
    pub lab_window: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn names(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeSpec {
    pub min: Option<i64>,
    pub max: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DoseSpec {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub unit: String,
}

/// A rule as written. Exactly one of the kind keys must be present.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub all: Option<Vec<RuleSpec>>,
    pub any: Option<Vec<RuleSpec>>,
    pub not: Option<Box<RuleSpec>>,
    pub age: Option<AgeSpec>,
    pub sex: Option<String>,
    pub lab: Option<String>,
    pub condition: Option<OneOrMany>,
    pub medication: Option<OneOrMany>,
    pub procedure: Option<OneOrMany>,
    pub immunization: Option<OneOrMany>,
    pub allergy: Option<OneOrMany>,
    pub biopsy: Option<String>,
    pub manual: Option<String>,

    // lab parameters
    pub op: Option<String>,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub window: Option<String>,
    pub ratio: Option<String>,
    pub equation: Option<String>,
    pub derive: Option<bool>,
    pub substitute: Option<String>,
    pub result: Option<String>,
    pub unconvertible_units: Option<UnitPolicy>,

    // event parameters
    pub status: Option<String>,
    pub within: Option<String>,
    pub onset_before: Option<String>,
    pub current: Option<bool>,
    pub route: Option<String>,
    pub total_dose: Option<DoseSpec>,
    pub classes: Option<Vec<String>>,
    pub without: Option<Vec<String>>,
    pub except: Option<OneOrMany>,
    pub no_records: Option<NoRecords>,
    pub missing_clinical_status: Option<MissingStatus>,

    // outcome modifiers
    pub review_if_met: Option<String>,
    pub review_if_not_met: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriterionSpec {
    pub id: String,
    pub kind: Kind,
    pub text: String,
    /// The listing's heading the criterion sits under, when its own text needs it.
    #[serde(default)]
    pub context: Option<String>,
    #[serde(default)]
    pub rule: Option<RuleSpec>,
    #[serde(default)]
    pub manual: Option<String>,
    /// A problem in the source text: the rule is evaluated as written and shown, but the
    /// criterion comes out `manual` with this note, so it never excludes anyone on its own.
    #[serde(default)]
    pub suspect: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialFile {
    pub id: String,
    pub title: String,
    pub source: String,
    #[serde(default)]
    pub defaults: Defaults,
    pub criteria: Vec<Located<CriterionSpec>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        match s.trim() {
            "<" => Some(Op::Lt),
            "<=" | "≤" => Some(Op::Le),
            ">" => Some(Op::Gt),
            ">=" | "≥" => Some(Op::Ge),
            _ => None,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "≤",
            Op::Gt => ">",
            Op::Ge => "≥",
        }
    }
}

#[derive(Debug, Clone)]
pub enum LabTest {
    Compare { op: Op, threshold: f64, written: String },
    Result(String),
}

#[derive(Debug, Clone)]
pub struct LabRule {
    pub lab: usize,
    pub test: LabTest,
    pub window: Span,
    pub uln_ratio: bool,
    pub equation: Option<String>,
    pub derive: bool,
    pub substitute: Option<usize>,
    pub unconvertible: UnitPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondStatus {
    Active,
    Any,
}

#[derive(Debug, Clone)]
pub struct ConditionRule {
    pub sets: Vec<usize>,
    pub except: Vec<usize>,
    pub status: CondStatus,
    pub within: Option<Span>,
    pub onset_before: Option<Span>,
    pub missing_status: MissingStatus,
}

/// Which routes a medication rule counts.
#[derive(Debug, Clone, Copy)]
pub enum RouteFilter {
    /// Only this route set (`route: oral` -> set `route-oral`).
    Only(usize),
    /// Anything but the local routes of set `route-local` (`route: systemic`): tacrolimus
    /// ointment or ciclosporin eye drops are not systemic immunosuppression.
    NotLocal(usize),
}

#[derive(Debug, Clone)]
pub struct MedicationRule {
    pub sets: Vec<usize>,
    pub within: Option<Span>,
    pub current: bool,
    pub route: Option<RouteFilter>,
    pub total_dose: Option<(Option<f64>, Option<f64>, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Procedure,
    Immunization,
}

#[derive(Debug, Clone)]
pub enum Rule {
    All(Vec<Node>),
    Any(Vec<Node>),
    Not(Box<Node>),
    Age {
        min: Option<i64>,
        max: Option<i64>,
    },
    Sex(String),
    Lab(LabRule),
    Condition(ConditionRule),
    Medication(MedicationRule),
    Event {
        kind: EventKind,
        sets: Vec<usize>,
        within: Option<Span>,
    },
    Allergy {
        sets: Vec<usize>,
    },
    Biopsy {
        kind: String,
        within: Option<Span>,
        classes: Vec<String>,
        without: Vec<String>,
    },
    Manual(String),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub rule: Rule,
    pub review_if_met: Option<String>,
    pub review_if_not_met: Option<String>,
    pub no_records: NoRecords,
}

#[derive(Debug, Clone)]
pub enum Decide {
    Rule(Node),
    Manual(String),
}

#[derive(Debug, Clone)]
pub struct Criterion {
    pub id: super::Id,
    pub kind: Kind,
    pub text: String,
    pub context: Option<String>,
    pub decide: Decide,
    pub suspect: Option<String>,
    pub note: Option<String>,
    pub line: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Trial {
    pub id: String,
    pub title: String,
    pub source: String,
    pub file: PathBuf,
    pub criteria: Vec<Criterion>,
}

impl Trial {
    /// The FHIR resource types this trial's rules read (Patient always), for sources that fetch
    /// only what is needed.
    /// The labs this trial's rules read: tested, stood in for, or derived from (by index).
    pub fn labs(&self, m: &crate::facts::mappings::Mappings) -> std::collections::BTreeSet<usize> {
        fn walk(n: &Node, m: &crate::facts::mappings::Mappings, out: &mut std::collections::BTreeSet<usize>) {
            match &n.rule {
                Rule::All(c) | Rule::Any(c) => c.iter().for_each(|c| walk(c, m, out)),
                Rule::Not(c) => walk(c, m, out),
                Rule::Lab(l) => {
                    out.insert(l.lab);
                    out.extend(l.substitute);
                    if l.derive {
                        let from = m.derived.get(&m.labs[l.lab].name).map(|d| d.from.as_slice()).unwrap_or_default();
                        out.extend(from.iter().filter_map(|f| m.lab(f)));
                    }
                }
                _ => {}
            }
        }
        let mut out = std::collections::BTreeSet::new();
        for c in &self.criteria {
            if let Decide::Rule(n) = &c.decide {
                walk(n, m, &mut out);
            }
        }
        out
    }

    pub fn resource_types(&self) -> std::collections::BTreeSet<&'static str> {
        fn walk(n: &Node, out: &mut std::collections::BTreeSet<&'static str>) {
            match &n.rule {
                Rule::All(c) | Rule::Any(c) => c.iter().for_each(|c| walk(c, out)),
                Rule::Not(c) => walk(c, out),
                Rule::Lab(_) => {
                    out.insert("Observation");
                }
                Rule::Condition(_) => {
                    out.insert("Condition");
                }
                Rule::Medication(_) => out.extend(["MedicationRequest", "MedicationStatement", "MedicationAdministration"]),
                Rule::Event {
                    kind: EventKind::Procedure,
                    ..
                } => {
                    out.insert("Procedure");
                }
                Rule::Event {
                    kind: EventKind::Immunization,
                    ..
                } => {
                    out.insert("Immunization");
                }
                Rule::Allergy { .. } => {
                    out.insert("AllergyIntolerance");
                }
                Rule::Biopsy { .. } => out.extend(["Procedure", "DiagnosticReport"]),
                Rule::Age { .. } | Rule::Sex(_) | Rule::Manual(_) => {}
            }
        }
        let mut out = std::collections::BTreeSet::from(["Patient"]);
        for c in &self.criteria {
            if let Decide::Rule(n) = &c.decide {
                walk(n, &mut out);
            }
        }
        out
    }
}

/// A finding of the suspect-threshold lint on a criterion that already says `suspect:`.
#[derive(Debug, Clone)]
pub struct Warning(pub String);

struct Ctx<'a> {
    m: &'a Mappings,
    file: &'a Path,
    crit: &'a str,
    line: Option<u64>,
    defaults: &'a Defaults,
    default_window: Span,
    errors: Vec<ConfigError>,
    /// Lab thresholds found, for the suspect-threshold lint: (lab, op).
    thresholds: Vec<(usize, Op)>,
}

impl Ctx<'_> {
    fn err(&mut self, msg: String) {
        self.errors
            .push(ConfigError::at(self.file, self.line, format!("criterion `{}`: {msg}", self.crit)));
    }

    fn span(&mut self, what: &str, s: &Option<String>) -> Option<Span> {
        let s = s.as_ref()?;
        let span = Span::parse(s);
        if span.is_none() {
            self.err(format!("{what} `{s}` is not a duration; write e.g. `90d`, `12w`, `3mo` or `2y`"));
        }
        span
    }

    fn sets(&mut self, names: &OneOrMany) -> Vec<usize> {
        let mut out = Vec::new();
        for n in names.names() {
            match self.m.set(&n) {
                Some(i) => out.push(i),
                None => self.err(format!("unknown set `{n}`; define it in mappings/ (see `trialgate check --list`)")),
            }
        }
        out
    }
}

const KIND_KEYS: &[&str] = &[
    "all",
    "any",
    "not",
    "age",
    "sex",
    "lab",
    "condition",
    "medication",
    "procedure",
    "immunization",
    "allergy",
    "biopsy",
    "manual",
];

fn kinds_present(r: &RuleSpec) -> Vec<&'static str> {
    let flags = [
        r.all.is_some(),
        r.any.is_some(),
        r.not.is_some(),
        r.age.is_some(),
        r.sex.is_some(),
        r.lab.is_some(),
        r.condition.is_some(),
        r.medication.is_some(),
        r.procedure.is_some(),
        r.immunization.is_some(),
        r.allergy.is_some(),
        r.biopsy.is_some(),
        r.manual.is_some(),
    ];
    KIND_KEYS.iter().zip(flags).filter(|(_, f)| *f).map(|(k, _)| *k).collect()
}

/// Parameters each kind accepts; any other parameter is an error (it would be silently ignored).
fn check_params(cx: &mut Ctx, kind: &str, r: &RuleSpec) {
    let given: Vec<(&str, bool)> = vec![
        ("op", r.op.is_some()),
        ("value", r.value.is_some()),
        ("unit", r.unit.is_some()),
        ("window", r.window.is_some()),
        ("ratio", r.ratio.is_some()),
        ("equation", r.equation.is_some()),
        ("derive", r.derive.is_some()),
        ("substitute", r.substitute.is_some()),
        ("result", r.result.is_some()),
        ("unconvertible_units", r.unconvertible_units.is_some()),
        ("status", r.status.is_some()),
        ("within", r.within.is_some()),
        ("onset_before", r.onset_before.is_some()),
        ("current", r.current.is_some()),
        ("route", r.route.is_some()),
        ("total_dose", r.total_dose.is_some()),
        ("classes", r.classes.is_some()),
        ("without", r.without.is_some()),
        ("except", r.except.is_some()),
        ("no_records", r.no_records.is_some()),
        ("missing_clinical_status", r.missing_clinical_status.is_some()),
    ];
    let allowed: &[&str] = match kind {
        "lab" => &[
            "op",
            "value",
            "unit",
            "window",
            "ratio",
            "equation",
            "derive",
            "substitute",
            "result",
            "unconvertible_units",
        ],
        "condition" => &[
            "status",
            "within",
            "onset_before",
            "except",
            "no_records",
            "missing_clinical_status",
        ],
        "medication" => &["within", "current", "route", "total_dose", "no_records"],
        "procedure" | "immunization" => &["within", "no_records"],
        "allergy" => &["no_records"],
        "biopsy" => &["within", "classes", "without"],
        _ => &[],
    };
    for (name, present) in given {
        if present && !allowed.contains(&name) {
            cx.err(format!(
                "`{name}` does not apply to a `{kind}` rule (it takes: {})",
                if allowed.is_empty() {
                    "no parameters".into()
                } else {
                    allowed.join(", ")
                }
            ));
        }
    }
}

fn compile(cx: &mut Ctx, r: &RuleSpec) -> Option<Node> {
    let kinds = kinds_present(r);
    let kind = match kinds.as_slice() {
        [k] => *k,
        [] => {
            cx.err(format!("a rule needs exactly one of: {}", KIND_KEYS.join(", ")));
            return None;
        }
        many => {
            cx.err(format!(
                "a rule has several kinds ({}); nest them under `all:` or `any:`",
                many.join(", ")
            ));
            return None;
        }
    };
    check_params(cx, kind, r);
    let no_records = r.no_records.unwrap_or(cx.defaults.no_records);
    let rule = match kind {
        "all" | "any" => {
            let children: Vec<RuleSpec> = r.all.clone().or_else(|| r.any.clone()).unwrap_or_default();
            if children.is_empty() {
                cx.err(format!("`{kind}` needs at least one rule"));
            }
            let nodes: Vec<Node> = children.iter().filter_map(|c| compile(cx, c)).collect();
            if kind == "all" { Rule::All(nodes) } else { Rule::Any(nodes) }
        }
        "not" => Rule::Not(Box::new(compile(cx, r.not.as_deref()?)?)),
        "age" => {
            let a = r.age.as_ref()?;
            if a.min.is_none() && a.max.is_none() {
                cx.err("`age` needs `min`, `max` or both".into());
            }
            Rule::Age { min: a.min, max: a.max }
        }
        "sex" => Rule::Sex(r.sex.clone()?),
        "manual" => Rule::Manual(r.manual.clone()?),
        "lab" => Rule::Lab(compile_lab(cx, r)?),
        "condition" => {
            let status = match r.status.as_deref() {
                None | Some("active") => CondStatus::Active,
                Some("any") => CondStatus::Any,
                Some(other) => {
                    cx.err(format!("condition `status: {other}`: use `active` (now) or `any` (ever recorded)"));
                    CondStatus::Active
                }
            };
            Rule::Condition(ConditionRule {
                sets: cx.sets(r.condition.as_ref()?),
                except: r.except.as_ref().map(|e| cx.sets(e)).unwrap_or_default(),
                status,
                within: cx.span("within", &r.within),
                onset_before: cx.span("onset_before", &r.onset_before),
                missing_status: r.missing_clinical_status.unwrap_or(cx.defaults.missing_clinical_status),
            })
        }
        "medication" => {
            let route = r.route.as_ref().and_then(|name| {
                let set = if name == "systemic" {
                    "route-local".to_string()
                } else {
                    format!("route-{name}")
                };
                let found = cx.m.set(&set);
                if found.is_none() {
                    cx.err(format!("route `{name}` needs a set `{set}` in the mappings"));
                }
                found.map(|s| {
                    if name == "systemic" {
                        RouteFilter::NotLocal(s)
                    } else {
                        RouteFilter::Only(s)
                    }
                })
            });
            let total_dose = r.total_dose.as_ref().map(|d| {
                if cx.m.dose_factor(&d.unit).is_none() {
                    cx.err(format!(
                        "total_dose unit `{}` is not a dose unit in the mappings (`dose_units`)",
                        d.unit
                    ));
                }
                (d.min, d.max, d.unit.clone())
            });
            Rule::Medication(MedicationRule {
                sets: cx.sets(r.medication.as_ref()?),
                within: cx.span("within", &r.within),
                current: r.current.unwrap_or(false),
                route,
                total_dose,
            })
        }
        "procedure" => Rule::Event {
            kind: EventKind::Procedure,
            sets: cx.sets(r.procedure.as_ref()?),
            within: cx.span("within", &r.within),
        },
        "immunization" => Rule::Event {
            kind: EventKind::Immunization,
            sets: cx.sets(r.immunization.as_ref()?),
            within: cx.span("within", &r.within),
        },
        "allergy" => Rule::Allergy {
            sets: cx.sets(r.allergy.as_ref()?),
        },
        "biopsy" => {
            let name = r.biopsy.clone()?;
            match cx.m.biopsies.get(&name) {
                Some(b) => {
                    for c in r.classes.iter().flatten().chain(r.without.iter().flatten()) {
                        if !b.classes.contains_key(c) {
                            cx.err(format!(
                                "biopsy `{name}` has no class `{c}` (known: {})",
                                b.classes.keys().cloned().collect::<Vec<_>>().join(", ")
                            ));
                        }
                    }
                }
                None => cx.err(format!("unknown biopsy kind `{name}`")),
            }
            Rule::Biopsy {
                kind: name,
                within: cx.span("within", &r.within),
                classes: r.classes.clone().unwrap_or_default(),
                without: r.without.clone().unwrap_or_default(),
            }
        }
        _ => unreachable!("KIND_KEYS lists every kind"),
    };
    Some(Node {
        rule,
        review_if_met: r.review_if_met.clone(),
        review_if_not_met: r.review_if_not_met.clone(),
        no_records,
    })
}

fn compile_lab(cx: &mut Ctx, r: &RuleSpec) -> Option<LabRule> {
    let name = r.lab.clone()?;
    let Some(lab) = cx.m.lab(&name) else {
        cx.err(format!(
            "unknown lab `{name}`; labs are defined in mappings/ (see `trialgate check --list`)"
        ));
        return None;
    };
    let spec = &cx.m.labs[lab].spec;
    let uln_ratio = match r.ratio.as_deref() {
        None => false,
        Some("uln") => {
            if spec.uln.is_none() {
                cx.err(format!(
                    "lab `{name}` has no `uln` default in the mappings, so `ratio: uln` cannot fall back"
                ));
            }
            true
        }
        Some(other) => {
            cx.err(format!("`ratio: {other}` is not supported; the only ratio is `uln`"));
            false
        }
    };
    let test = match (&r.result, &r.op, r.value) {
        (Some(res), None, None) => {
            if !spec.results.contains_key(res) {
                cx.err(format!(
                    "lab `{name}` has no result `{res}` (known: {})",
                    spec.results.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            LabTest::Result(res.clone())
        }
        (None, Some(op), Some(value)) => {
            let Some(op) = Op::parse(op) else {
                cx.err(format!("`op: {op}` is not one of <, <=, >, >="));
                return None;
            };
            let threshold = if uln_ratio {
                if r.unit.is_some() {
                    cx.err("a `ratio: uln` threshold is a multiple of the ULN and takes no `unit`".into());
                }
                value
            } else {
                let Some(unit) = &r.unit else {
                    cx.err(format!("threshold {value} needs a `unit` (lab `{name}` is in {})", spec.unit));
                    return None;
                };
                match cx.m.lab_factor(lab, unit) {
                    Some(f) => f.apply(value),
                    None => {
                        cx.err(format!(
                            "threshold unit `{unit}` cannot be converted to `{}` for lab `{name}` (accepted: {})",
                            spec.unit,
                            spec.units.keys().cloned().collect::<Vec<_>>().join(", ")
                        ));
                        return None;
                    }
                }
            };
            cx.thresholds.push((lab, op));
            let written = if uln_ratio {
                format!("{} {value} × ULN", op.symbol())
            } else {
                format!("{} {value} {}", op.symbol(), r.unit.clone().unwrap_or_default())
            };
            LabTest::Compare { op, threshold, written }
        }
        _ => {
            cx.err("a lab rule needs either `op` with `value` (and `unit`), or `result`".into());
            return None;
        }
    };
    if let Some(eq) = &r.equation {
        if !cx.m.labs[lab]
            .spec
            .equations
            .keys()
            .any(|k| k == eq || k.starts_with(&format!("{eq}-")))
        {
            cx.err(format!(
                "lab `{name}` has no equation `{eq}` (known: {})",
                spec.equations.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let substitute = r.substitute.as_ref().and_then(|s| {
        let found = cx.m.lab(s);
        if found.is_none() {
            cx.err(format!("substitute lab `{s}` is unknown"));
        }
        found
    });
    let window = match &r.window {
        Some(_) => cx.span("window", &r.window)?,
        None => cx.default_window,
    };
    Some(LabRule {
        lab,
        test,
        window,
        uln_ratio,
        equation: r.equation.clone(),
        derive: r.derive.unwrap_or(true),
        substitute,
        unconvertible: r.unconvertible_units.unwrap_or(cx.defaults.unconvertible_units),
    })
}

/// Loads and compiles one trial file. Returns the trial and the lint warnings.
pub fn load_trial(path: &Path, m: &Mappings) -> Result<(Trial, Vec<Warning>), ConfigError> {
    let file: TrialFile = read_yaml(path)?;
    compile_trial(path, file, m)
}

pub fn compile_trial(path: &Path, file: TrialFile, m: &Mappings) -> Result<(Trial, Vec<Warning>), ConfigError> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let default_window = match &file.defaults.lab_window {
        Some(s) => Span::parse(s).unwrap_or_else(|| {
            errors.push(ConfigError::at(path, None, format!("defaults.lab_window `{s}` is not a duration")));
            Span::Days(90)
        }),
        None => Span::Days(90),
    };
    if file.id.trim().is_empty() {
        errors.push(ConfigError::at(path, None, "`id` is empty".into()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut criteria = Vec::new();
    for c in &file.criteria {
        let line = c.line;
        let spec = &c.value;
        if !seen.insert(spec.id.clone()) {
            errors.push(ConfigError::at(
                path,
                line,
                format!("criterion id `{}` is used twice; ids must be unique in a trial", spec.id),
            ));
        }
        if spec.text.trim().is_empty() {
            errors.push(ConfigError::at(
                path,
                line,
                format!("criterion `{}` has no text; quote the listing verbatim", spec.id),
            ));
        }
        let mut cx = Ctx {
            m,
            file: path,
            crit: &spec.id,
            line,
            defaults: &file.defaults,
            default_window,
            errors: Vec::new(),
            thresholds: Vec::new(),
        };
        let decide = match (&spec.rule, &spec.manual) {
            (Some(r), None) => compile(&mut cx, r).map(Decide::Rule),
            (None, Some(reason)) => Some(Decide::Manual(reason.clone())),
            (Some(_), Some(_)) => {
                cx.err("has both `rule` and `manual`; put the manual part inside the rule (`review_if_met`, `review_if_not_met` or a `manual:` leaf)".into());
                None
            }
            (None, None) => {
                cx.err("needs a `rule`, or `manual` with the reason it cannot be decided from data".into());
                None
            }
        };
        // The suspect-threshold lint: an inclusion that requires a low value (or an exclusion
        // that rejects a high value) of a lab where high is healthy reads like an inverted sign.
        for (lab, op) in std::mem::take(&mut cx.thresholds) {
            let healthy_high = m.labs[lab].spec.higher_is_healthier;
            let upper = matches!(op, Op::Lt | Op::Le);
            let suspect = healthy_high && ((spec.kind == Kind::Inclusion && upper) || (spec.kind == Kind::Exclusion && !upper));
            if suspect {
                let what = format!(
                    "criterion `{}`: {} {} on `{}`, where higher is healthier, looks inverted",
                    spec.id,
                    spec.kind.as_str(),
                    op.symbol(),
                    m.labs[lab].name
                );
                if spec.suspect.is_some() {
                    warnings.push(Warning(format!("{}: {what} (acknowledged: evaluated as manual)", path.display())));
                } else {
                    cx.err(format!("{} {} on `{}`, where higher is healthier, looks inverted; if the listing really says so, keep it and add `suspect:` with a note so it is evaluated as manual", spec.kind.as_str(), op.symbol(), m.labs[lab].name));
                }
            }
        }
        errors.append(&mut cx.errors);
        if let Some(decide) = decide {
            criteria.push(Criterion {
                id: spec.id.as_str().into(),
                kind: spec.kind,
                text: spec.text.clone(),
                context: spec.context.clone(),
                decide,
                suspect: spec.suspect.clone(),
                note: spec.note.clone(),
                line,
            });
        }
    }
    if criteria.is_empty() && errors.is_empty() {
        errors.push(ConfigError::at(path, None, "the trial has no criteria".into()));
    }
    if !errors.is_empty() {
        return Err(ConfigError::Many(errors));
    }
    Ok((
        Trial {
            id: file.id,
            title: file.title,
            source: file.source,
            file: path.to_path_buf(),
            criteria,
        },
        warnings,
    ))
}
