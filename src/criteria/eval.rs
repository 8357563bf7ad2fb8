//! The evaluator: rules x facts -> outcomes, for a given screening date.
//!
//! Pure and deterministic: no I/O, no clock, no randomness. Four outcomes combine with
//! Kleene's three-valued logic (`manual` and `unknown` are both "undecided"; the combination
//! is `manual` when any undecided part needs a person). Missing data is `unknown`, never a
//! silent `not-met`.

use super::trial::*;
use super::{Detail, Kind, Outcome, Status};
use crate::facts::derive;
use crate::facts::mappings::Mappings;
use crate::facts::{Bound, Bounded, LabValue, MedSource, PatientFacts, Reading};
use crate::time::{Date, Instant, Span, Window};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, PartialEq, Deserialize)]
pub struct Evidence {
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalized_unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Evidence {
    fn of(resource: &str) -> Evidence {
        Evidence {
            resource: resource.to_string(),
            value: None,
            unit: None,
            normalized_value: None,
            normalized_unit: None,
            date: None,
            code: None,
            note: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Deserialize)]
pub struct FactOut {
    pub name: String,
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub derived_from: Vec<String>,
}

/// A rule's outcome, and what explains it when the evaluation explains.
#[derive(Debug, Clone)]
pub struct NodeResult {
    pub outcome: Outcome,
    /// None: nothing to explain (the evaluation does not explain). Boxed, so that a result
    /// is two words: every node of every criterion of every patient returns one, and with
    /// its explanation inline (80 bytes) moving and dropping them was a sixth of evaluating
    /// the five seed trials.
    why: Option<Box<Why>>,
}

#[derive(Debug, Clone, Default)]
pub struct Why {
    pub reason: String,
    pub evidence: Vec<Evidence>,
    pub facts: Vec<FactOut>,
}

impl NodeResult {
    /// An empty reason (what the evaluation gives when it does not explain) makes no
    /// explanation of its own.
    #[inline]
    fn new(outcome: Outcome, reason: String) -> NodeResult {
        let why = (!reason.is_empty()).then(|| Box::new(Why { reason, ..Why::default() }));
        NodeResult { outcome, why }
    }

    pub fn reason(&self) -> &str {
        self.why.as_ref().map_or("", |w| &w.reason)
    }

    /// As [`NodeResult::new`] sets it.
    #[inline]
    fn set_reason(&mut self, reason: String) {
        match &mut self.why {
            Some(w) => w.reason = reason,
            None if reason.is_empty() => {}
            None => self.explained().reason = reason,
        }
    }

    /// The explanation, made on first use: only code that explains calls it.
    fn explained(&mut self) -> &mut Why {
        self.why.get_or_insert_with(Box::default)
    }

    pub fn into_why(self) -> Why {
        self.why.map(|w| *w).unwrap_or_default()
    }

    /// Attaches evidence, built only when the evaluation explains.
    fn with_evidence(mut self, cx: &Ctx, evidence: impl FnOnce() -> Vec<Evidence>) -> NodeResult {
        if cx.explain {
            self.explained().evidence = evidence();
        }
        self
    }
}

pub struct Ctx<'a> {
    pub facts: &'a PatientFacts,
    pub m: &'a Mappings,
    pub as_of: Date,
    /// Whether to build reasons, evidence and facts ([`Detail::Full`]). When false every
    /// explanation is left empty, and only the outcomes are computed: by the same code.
    pub explain: bool,
}

impl Ctx<'_> {
    /// `text()` when explaining, else an empty String (which allocates nothing).
    fn say(&self, text: impl FnOnce() -> String) -> String {
        if self.explain { text() } else { String::new() }
    }
}

/// `format!` when the evaluation explains, else an empty String: the arguments (dates,
/// windows, numbers formatted) are not even evaluated when nobody will read the text.
macro_rules! why {
    ($cx:expr, $($fmt:tt)+) => {
        if $cx.explain { format!($($fmt)+) } else { String::new() }
    };
}

pub fn eval_node(cx: &Ctx, node: &Node) -> NodeResult {
    let mut r = match &node.rule {
        Rule::All(children) => combine(cx, children, true),
        Rule::Any(children) => combine(cx, children, false),
        Rule::Not(child) => {
            let mut r = eval_node(cx, child);
            r.outcome = match r.outcome {
                Outcome::Met => Outcome::NotMet,
                Outcome::NotMet => Outcome::Met,
                o => o,
            };
            r.set_reason(why!(cx, "not ({})", r.reason()));
            r
        }
        Rule::Age { min, max } => age(cx, *min, *max),
        Rule::Sex(s) => match cx.facts.demographics.gender.as_deref() {
            // FHIR's `unknown` means "applicable but not known": missing, not a third value.
            None | Some("unknown") => NodeResult::new(Outcome::Unknown, cx.say(|| "sex not recorded".into())),
            Some(g) if g == s => NodeResult::new(Outcome::Met, why!(cx, "sex is {g}")),
            Some(g) => NodeResult::new(Outcome::NotMet, why!(cx, "sex is {g}")),
        },
        Rule::Manual(reason) => NodeResult::new(Outcome::Manual, cx.say(|| reason.clone())),
        Rule::Lab(l) => lab(cx, l),
        Rule::Condition(c) => condition(cx, c, node.no_records),
        Rule::Medication(m) => medication(cx, m, node.no_records),
        Rule::Event { kind, sets, within } => event(cx, *kind, sets, *within, node.no_records),
        Rule::Allergy { sets } => allergy(cx, sets, node.no_records),
        Rule::Biopsy {
            kind,
            within,
            classes,
            without,
        } => biopsy(cx, kind, *within, classes, without),
    };
    match (r.outcome, &node.review_if_met, &node.review_if_not_met) {
        (Outcome::Met, Some(why), _) | (Outcome::NotMet, _, Some(why)) => {
            r.set_reason(why!(cx, "{}; needs review: {why}", r.reason()));
            r.outcome = Outcome::Manual;
        }
        _ => {}
    }
    r
}

/// Kleene's combination of the parts' outcomes (`all`: and; else or). Stops at the first
/// decisive part (not-met for and, met for or): nothing after it can change the outcome, so
/// an evaluation that is not explaining need not evaluate the rest.
fn kleene(outcomes: impl Iterator<Item = Outcome>, all: bool) -> Outcome {
    let decisive = if all { Outcome::NotMet } else { Outcome::Met };
    let (mut manual, mut unknown) = (false, false);
    for o in outcomes {
        match o {
            o if o == decisive => return decisive,
            Outcome::Manual => manual = true,
            Outcome::Unknown => unknown = true,
            _ => {}
        }
    }
    match (manual, unknown) {
        (true, _) => Outcome::Manual,
        (false, true) => Outcome::Unknown,
        (false, false) if all => Outcome::Met,
        (false, false) => Outcome::NotMet,
    }
}

fn combine(cx: &Ctx, children: &[Node], all: bool) -> NodeResult {
    if !cx.explain {
        // Evaluation is pure: skipping the parts after a decisive one changes no outcome.
        return NodeResult::new(kleene(children.iter().map(|c| eval_node(cx, c).outcome), all), String::new());
    }
    let results: Vec<NodeResult> = children.iter().map(|c| eval_node(cx, c)).collect();
    let decisive = if all { Outcome::NotMet } else { Outcome::Met };
    let outcome = kleene(results.iter().map(|r| r.outcome), all);
    // Explain with the parts that decided: the decisive ones, or the undecided ones, or all.
    let shown: Vec<&NodeResult> = match outcome {
        o if o == decisive => results.iter().filter(|r| r.outcome == decisive).collect(),
        Outcome::Manual | Outcome::Unknown => results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Manual | Outcome::Unknown))
            .collect(),
        _ => results.iter().collect(),
    };
    let joiner = if all { "; and " } else { "; or " };
    // Parts often fail for the same reason ("no medication records at all"): say it once.
    let mut reasons: Vec<&str> = Vec::new();
    for r in &shown {
        if !reasons.contains(&r.reason()) {
            reasons.push(r.reason());
        }
    }
    let mut out = NodeResult::new(outcome, reasons.join(joiner));
    let why = out.explained();
    for r in results {
        let Why { evidence, facts, .. } = r.into_why();
        for e in evidence {
            if !why.evidence.contains(&e) {
                why.evidence.push(e);
            }
        }
        for f in facts {
            if !why.facts.contains(&f) {
                why.facts.push(f);
            }
        }
    }
    out
}

fn age(cx: &Ctx, min: Option<i64>, max: Option<i64>) -> NodeResult {
    let d = &cx.facts.demographics;
    let Some(birth) = d.birth_date else {
        let why = cx.say(|| match &d.birth_text {
            Some(t) => format!("birthDate `{t}` is not a full date"),
            None => "birthDate not recorded".into(),
        });
        return NodeResult::new(Outcome::Unknown, why);
    };
    let years = cx.as_of.years_since(birth);
    let ok = min.is_none_or(|lo| years >= lo) && max.is_none_or(|hi| years <= hi);
    let mut r = NodeResult::new(
        if ok { Outcome::Met } else { Outcome::NotMet },
        cx.say(|| {
            let range = match (min, max) {
                (Some(lo), Some(hi)) => format!("{lo}–{hi}"),
                (Some(lo), None) => format!("≥ {lo}"),
                (None, Some(hi)) => format!("≤ {hi}"),
                (None, None) => String::new(),
            };
            format!("age {years} at {} (required {range})", cx.as_of)
        }),
    );
    if cx.explain {
        let why = r.explained();
        why.evidence.push(Evidence {
            date: Some(birth.to_string()),
            note: Some("birthDate".into()),
            ..Evidence::of(&cx.facts.key)
        });
        why.facts.push(FactOut {
            name: "age".into(),
            value: years.into(),
            unit: Some("a".into()),
            derived_from: vec![cx.facts.key.clone()],
        });
    }
    r
}

/// Three-valued threshold test of a possibly-bounded value: decided only when every value
/// the bound allows gives the same answer.
pub fn compare(v: Bounded, op: Op, t: f64) -> Option<bool> {
    let exact = |x: f64| match op {
        Op::Lt => x < t,
        Op::Le => x <= t,
        Op::Gt => x > t,
        Op::Ge => x >= t,
    };
    match v.bound {
        None => Some(exact(v.value)),
        // x <= v: x can be arbitrarily small, and as large as v.
        Some(Bound::AtMost) => match op {
            Op::Lt | Op::Le => exact(v.value).then_some(true),
            Op::Gt | Op::Ge => (!exact(v.value)).then_some(false),
        },
        // x >= v: x can be arbitrarily large, and as small as v.
        Some(Bound::AtLeast) => match op {
            Op::Gt | Op::Ge => exact(v.value).then_some(true),
            Op::Lt | Op::Le => (!exact(v.value)).then_some(false),
        },
    }
}

fn fmt_num(x: f64) -> String {
    let r = (x * 1000.0).round() / 1000.0;
    if r == r.trunc() { format!("{}", r as i64) } else { format!("{r}") }
}

fn fmt_bounded(b: Bounded) -> String {
    let p = match b.bound {
        None => "",
        Some(Bound::AtMost) => "≤",
        Some(Bound::AtLeast) => "≥",
    };
    format!("{p}{}", fmt_num(b.value))
}

fn latest<'a>(values: impl Iterator<Item = &'a LabValue>) -> Option<&'a LabValue> {
    values.max_by(|a, b| a.time.cmp(&b.time).then_with(|| a.tie.cmp(&b.tie)))
}

fn lab_evidence(v: &LabValue, canonical: &str, note: Option<String>) -> Evidence {
    let value = v
        .raw_value
        .map(serde_json::Value::from)
        .or_else(|| v.raw_text.clone().map(serde_json::Value::from));
    let normalized = match &v.reading {
        Reading::Number(b) => Some(b.value),
        _ => None,
    };
    Evidence {
        resource: v.resource.clone(),
        value,
        unit: v.raw_unit.clone(),
        normalized_value: normalized,
        normalized_unit: normalized.map(|_| canonical.to_string()),
        date: Some(v.time.to_string()),
        code: Some(v.code.clone()),
        note,
    }
}

fn equation_ok(rule: &Option<String>, v: &LabValue) -> bool {
    match rule {
        None => true,
        // The named equation, or a variant of it (`ckd-epi-2021` covers `ckd-epi-2021-cystatin`).
        Some(eq) => v
            .equation
            .as_deref()
            .and_then(|e| e.strip_prefix(eq.as_str()))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-')),
    }
}

fn lab(cx: &Ctx, l: &LabRule) -> NodeResult {
    let spec = &cx.m.labs[l.lab];
    let name = &cx.m.labs[l.lab].name;
    let window = Window::lookback(l.window, cx.as_of);
    let all: &[LabValue] = cx.facts.labs.get(&l.lab).map(Vec::as_slice).unwrap_or(&[]);
    let in_window = || all.iter().filter(|v| window.contains(v.time));
    let usable = in_window().filter(|v| equation_ok(&l.equation, v)).filter(|v| {
        l.unconvertible == UnitPolicy::Unknown || !matches!(v.reading, Reading::Unconvertible { .. } | Reading::BadComparator(_))
    });
    let mut notes = Vec::new();
    if cx.explain && l.equation.is_some() {
        let mut other_equations = in_window().filter(|v| !equation_ok(&l.equation, v));
        if let Some(first) = other_equations.next() {
            notes.push(format!(
                "{} value(s) by another equation ({}) not used: the criterion names {}",
                1 + other_equations.count(),
                first.equation.as_deref().unwrap_or("unspecified"),
                l.equation.as_deref().unwrap_or("")
            ));
        }
    }
    let (value, derived): (Option<Found>, bool) = match latest(usable) {
        Some(v) => {
            let ev = || lab_evidence(v, &spec.spec.unit, v.equation.as_ref().map(|e| format!("reported ({e})")));
            match &v.reading {
                Reading::Number(b) => {
                    let mut b = *b;
                    let mut desc = why!(cx, "{name} {} {} on {}", fmt_bounded(b), spec.spec.unit, v.time.date());
                    let mut evidence = if cx.explain { vec![ev()] } else { Vec::new() };
                    if l.uln_ratio {
                        let (uln, source) = match uln_for(cx, l, v) {
                            Ok(u) => u,
                            Err(why) => return NodeResult::new(Outcome::Unknown, why!(cx, "{name}: {why}")),
                        };
                        // Value and ULN went through the same unit conversion, which can turn an
                        // exact 2.5 (3.25 / 1.3 mg/dL) into 2.4999999999999996: round that noise off.
                        b = Bounded {
                            value: (b.value / uln * 1e9).round() / 1e9,
                            bound: b.bound,
                        };
                        if cx.explain {
                            desc = format!("{desc} = {} × ULN (ULN {} from {source})", fmt_bounded(b), fmt_num(uln));
                            if let Some(e) = evidence.first_mut() {
                                e.note = Some(format!(
                                    "ULN {} {} from {source}; ratio {}",
                                    fmt_num(uln),
                                    spec.spec.unit,
                                    fmt_num(b.value)
                                ));
                            }
                        }
                    }
                    let found = Found {
                        value: b,
                        evidence,
                        from: if cx.explain { vec![v.resource.clone()] } else { Vec::new() },
                        desc,
                    };
                    (Some(found), false)
                }
                Reading::Unconvertible { raw_unit } => {
                    let why = why!(
                        cx,
                        "latest {name} ({}) is in unit `{raw_unit}`, which cannot be converted to {}",
                        v.time.date(),
                        spec.spec.unit
                    );
                    return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || vec![ev()]);
                }
                Reading::BadComparator(c) => {
                    let why = why!(cx, "latest {name} has comparator `{c}`, which cannot be compared");
                    return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || vec![ev()]);
                }
                Reading::Result(res) => {
                    let mut r = match &l.test {
                        LabTest::Result(want) => NodeResult::new(
                            if res == want { Outcome::Met } else { Outcome::NotMet },
                            why!(cx, "latest {name} on {} is {res}", v.time.date()),
                        ),
                        LabTest::Compare { .. } => NodeResult::new(
                            Outcome::Unknown,
                            why!(cx, "latest {name} is a qualitative result ({res}), not a number"),
                        ),
                    };
                    if cx.explain {
                        let why = r.explained();
                        why.evidence.push(ev());
                        why.facts.push(FactOut {
                            name: name.clone(),
                            value: res.clone().into(),
                            unit: None,
                            derived_from: vec![v.resource.clone()],
                        });
                    }
                    return r;
                }
            }
        }
        None => match derive_value(cx, l, window) {
            Ok(Some(d)) => (Some(d), true),
            Ok(None) => (None, false),
            Err(why) => {
                notes.push(why);
                (None, false)
            }
        },
    };
    let Some(Found {
        value: b,
        evidence,
        from,
        desc,
    }) = value.or_else(|| substitute(cx, l, window, &mut notes))
    else {
        let mut why = why!(cx, "no valid {name} from {window}");
        if cx.explain && !notes.is_empty() {
            why = format!("{why}; {}", notes.join("; "));
        }
        return NodeResult::new(Outcome::Unknown, why);
    };
    let LabTest::Compare { op, threshold, written } = &l.test else {
        return NodeResult::new(
            Outcome::Unknown,
            why!(cx, "{desc}: a number, but the criterion asks for a qualitative result"),
        );
    };
    let outcome = match compare(b, *op, *threshold) {
        Some(true) => Outcome::Met,
        Some(false) => Outcome::NotMet,
        None => Outcome::Unknown,
    };
    if !cx.explain {
        return NodeResult::new(outcome, String::new());
    }
    let verdict = match outcome {
        Outcome::Met => "meets",
        Outcome::NotMet => "does not meet",
        _ => "is a bound that cannot decide",
    };
    let mut reason = format!("{desc} {verdict} {written}");
    if derived {
        reason = format!("{reason} (derived)");
    }
    if !notes.is_empty() {
        reason = format!("{reason}; {}", notes.join("; "));
    }
    let mut r = NodeResult::new(outcome, reason);
    let why = r.explained();
    why.evidence = evidence;
    let fact_name = if l.uln_ratio { format!("{name}_x_uln") } else { name.clone() };
    why.facts.push(FactOut {
        name: fact_name,
        value: serde_json::Value::from(b.value),
        unit: (!l.uln_ratio).then(|| spec.spec.unit.clone()),
        derived_from: from,
    });
    r
}

/// The upper limit of normal for a value, in canonical units, and where it came from: the
/// Observation's own referenceRange, else the lab's configured default.
fn uln_for(cx: &Ctx, l: &LabRule, v: &LabValue) -> Result<(f64, &'static str), String> {
    let spec = &cx.m.labs[l.lab].spec;
    let (uln, source) = match (v.uln, &spec.uln) {
        (Some(u), _) => (u, "the Observation's referenceRange"),
        (None, Some(d)) => match cx.m.lab_factor(l.lab, &d.unit) {
            Some(f) => (f.apply(d.default), "the configured default"),
            None => return Err(why!(cx, "default ULN unit {} cannot be converted", d.unit)),
        },
        (None, None) => return Err(cx.say(|| "no ULN on the Observation and no default configured".into())),
    };
    if uln <= 0.0 {
        return Err(why!(cx, "ULN {uln} is not positive"));
    }
    Ok((uln, source))
}

/// A value a lab rule can test, reported, derived or stood in, with how it was found.
struct Found {
    value: Bounded,
    evidence: Vec<Evidence>,
    /// The resources it came from.
    from: Vec<String>,
    /// How it reads in the reason ("egfr 38 mL/min/{1.73_m2} on 2026-05-02").
    desc: String,
}

impl Found {
    /// The value alone, for an evaluation that does not explain.
    fn bare(value: Bounded) -> Found {
        Found {
            value,
            evidence: Vec::new(),
            from: Vec::new(),
            desc: String::new(),
        }
    }
}

/// A derived value when no reported one exists in the window: eGFR by CKD-EPI 2021 from serum
/// creatinine, BMI from weight and height. `Err` explains why it could not be derived.
fn derive_value(cx: &Ctx, l: &LabRule, window: Window) -> Result<Option<Found>, String> {
    let name = cx.m.labs[l.lab].name.as_str();
    let Some(spec) = cx.m.derived.get(name) else { return Ok(None) };
    if !l.derive {
        return Ok(None);
    }
    let latest_of = |lab: &str, w: Option<Window>| -> Option<&LabValue> {
        let i = cx.m.lab(lab)?;
        latest(
            cx.facts
                .labs
                .get(&i)?
                .iter()
                .filter(|v| w.is_none_or(|w| w.contains(v.time)) && matches!(v.reading, Reading::Number(_))),
        )
    };
    let number = |v: &LabValue| match v.reading {
        Reading::Number(b) => b,
        _ => Bounded {
            value: f64::NAN,
            bound: None,
        },
    };
    match name {
        "egfr" => {
            if l.equation.as_deref().is_some_and(|e| !"ckd-epi-2021".starts_with(e)) {
                return Ok(None);
            }
            let src = spec.from.first().map(String::as_str).unwrap_or("creatinine");
            // The latest creatinine decides, whatever its form: deriving from an older one
            // because the newest is in an unreadable unit would hide a change.
            let latest_any =
                cx.m.lab(src)
                    .and_then(|i| latest(cx.facts.labs.get(&i)?.iter().filter(|v| window.contains(v.time))));
            match latest_any.map(|v| &v.reading) {
                None => return Ok(None),
                Some(Reading::Number(_)) => {}
                Some(Reading::Unconvertible { raw_unit }) => {
                    return Err(why!(
                        cx,
                        "eGFR not derived: the latest serum creatinine is in unit `{raw_unit}`, which cannot be converted"
                    ));
                }
                Some(_) => return Err(cx.say(|| "eGFR not derived: the latest serum creatinine is not a usable number".into())),
            }
            let Some(cr) = latest_of(src, Some(window)) else { return Ok(None) };
            let d = &cx.facts.demographics;
            let female = match d.gender.as_deref() {
                Some("female") => true,
                Some("male") => false,
                _ => return Err(cx.say(|| "eGFR not derived: CKD-EPI 2021 needs sex male or female".into())),
            };
            let Some(birth) = d.birth_date else {
                return Err(cx.say(|| "eGFR not derived: birthDate unknown".into()));
            };
            let age = cr.time.date().years_since(birth);
            if age < 18 {
                return Err(why!(
                    cx,
                    "eGFR not derived: CKD-EPI 2021 is validated for adults and the patient was {age} at the creatinine test"
                ));
            }
            let scr = number(cr);
            let value = derive::ckd_epi_2021(scr.value, age, female);
            // eGFR falls as creatinine rises, so a bound on creatinine flips direction.
            let bound = scr.bound.map(|b| if b == Bound::AtMost { Bound::AtLeast } else { Bound::AtMost });
            if !cx.explain {
                return Ok(Some(Found::bare(Bounded { value, bound })));
            }
            let ev = lab_evidence(
                cr,
                &cx.m.labs[cx.m.lab(src).unwrap_or(l.lab)].spec.unit,
                Some(format!(
                    "serum creatinine used for CKD-EPI 2021 (age {age}, {})",
                    if female { "female" } else { "male" }
                )),
            );
            let desc = format!(
                "egfr {} mL/min/{{1.73_m2}} by CKD-EPI 2021 from serum creatinine {} mg/dL on {}",
                fmt_bounded(Bounded { value, bound }),
                fmt_bounded(scr),
                cr.time.date()
            );
            Ok(Some(Found {
                value: Bounded { value, bound },
                evidence: vec![ev],
                from: vec![cr.resource.clone()],
                desc,
            }))
        }
        "bmi" => {
            let (Some(w), Some(h)) = (spec.from.first(), spec.from.get(1)) else {
                return Ok(None);
            };
            let Some(wv) = latest_of(w, Some(window)) else { return Ok(None) };
            let Some(hv) = latest_of(
                h,
                Some(Window {
                    start: Instant(i64::MIN),
                    end: window.end,
                }),
            ) else {
                return Err(cx.say(|| "BMI not derived: no height recorded".into()));
            };
            let (wb, hb) = (number(wv), number(hv));
            if wb.bound.is_some() || hb.bound.is_some() || hb.value <= 0.0 {
                return Err(cx.say(|| "BMI not derived: weight or height is not an exact value".into()));
            }
            let value = derive::bmi(wb.value, hb.value);
            if !cx.explain {
                return Ok(Some(Found::bare(Bounded { value, bound: None })));
            }
            let evs = vec![
                lab_evidence(wv, "kg", Some("weight used for BMI".into())),
                lab_evidence(hv, "cm", Some("height used for BMI".into())),
            ];
            let desc = format!(
                "bmi {} kg/m2 from weight {} kg ({}) and height {} cm",
                fmt_num(value),
                fmt_num(wb.value),
                wv.time.date(),
                fmt_num(hb.value)
            );
            Ok(Some(Found {
                value: Bounded { value, bound: None },
                evidence: evs,
                from: vec![wv.resource.clone(), hv.resource.clone()],
                desc,
            }))
        }
        _ => Ok(None),
    }
}

/// For each lab (by index), the span of time in which any rule of `trials` reads its values at
/// `as_of` or any later date; None for a lab no rule reads. A value outside its lab's span
/// cannot change any verdict now or later (windows only move forward), so a reader may drop
/// it as it streams, and a stored fact state may forget it. The span is open at the end: a
/// value dated after `as_of` is kept for the later dates an incremental run screens at. This
/// mirrors the windows `lab`, `derive_value` and `substitute` apply, and must change with them.
pub fn lab_spans(trials: &[Trial], m: &Mappings, as_of: Date) -> Vec<Option<Window>> {
    fn widen(spans: &mut [Option<Window>], lab: usize, w: Window) {
        let s = &mut spans[lab];
        *s = Some(match *s {
            None => w,
            Some(o) => Window {
                start: o.start.min(w.start),
                end: o.end.max(w.end),
            },
        });
    }
    fn walk(n: &Node, m: &Mappings, as_of: Date, spans: &mut [Option<Window>]) {
        match &n.rule {
            Rule::All(c) | Rule::Any(c) => c.iter().for_each(|c| walk(c, m, as_of, spans)),
            Rule::Not(c) => walk(c, m, as_of, spans),
            Rule::Lab(l) => {
                let window = Window::lookback(l.window, as_of);
                widen(spans, l.lab, window);
                if let Some(s) = l.substitute {
                    widen(spans, s, window);
                }
                let name = m.labs[l.lab].name.as_str();
                if let (true, Some(spec)) = (l.derive, m.derived.get(name)) {
                    for (i, from) in spec.from.iter().enumerate() {
                        let Some(f) = m.lab(from) else { continue };
                        // BMI takes the latest height on record, however old.
                        let any_age = !(name == "egfr" || (name == "bmi" && i == 0));
                        let w = if any_age {
                            Window {
                                start: Instant(i64::MIN),
                                end: window.end,
                            }
                        } else {
                            window
                        };
                        widen(spans, f, w);
                    }
                }
            }
            _ => {}
        }
    }
    let mut spans = vec![None; m.labs.len()];
    for t in trials {
        for c in &t.criteria {
            if let Decide::Rule(n) = &c.decide {
                walk(n, m, as_of, &mut spans);
            }
        }
    }
    for w in spans.iter_mut().flatten() {
        w.end = Instant(i64::MAX);
    }
    spans
}

/// A stand-in lab the trial explicitly accepts (a spot UPCR for 24-hour protein), shown as such.
fn substitute(cx: &Ctx, l: &LabRule, window: Window, notes: &mut Vec<String>) -> Option<Found> {
    let name = &cx.m.labs[l.lab].name;
    let s = l.substitute?;
    let sname = &cx.m.labs[s].name;
    let sv = latest(cx.facts.labs.get(&s)?.iter().filter(|v| window.contains(v.time)))?;
    let Reading::Number(b) = sv.reading else {
        notes.push(why!(cx, "the latest {sname} cannot stand in: it is not a usable number"));
        return None;
    };
    if !cx.explain {
        return Some(Found::bare(b));
    }
    let note = format!(
        "{sname} {} {} used in place of {name}, as this trial allows",
        fmt_bounded(b),
        cx.m.labs[s].spec.unit
    );
    let ev = lab_evidence(sv, &cx.m.labs[s].spec.unit, Some(note.clone()));
    Some(Found {
        value: b,
        evidence: vec![ev],
        from: vec![sv.resource.clone()],
        desc: note,
    })
}

fn set_names(cx: &Ctx, sets: &[usize]) -> String {
    sets.iter().map(|&s| cx.m.sets[s].name.as_str()).collect::<Vec<_>>().join("/")
}

fn none_recorded(cx: &Ctx, what: &str, present: bool, policy: NoRecords, not_met: impl FnOnce() -> String) -> NodeResult {
    if !present && policy == NoRecords::Unknown {
        NodeResult::new(Outcome::Unknown, why!(cx, "the record holds no {what} at all"))
    } else {
        NodeResult::new(Outcome::NotMet, cx.say(not_met))
    }
}

fn fmt_time(t: Option<Instant>) -> String {
    t.map(|t| t.date().to_string()).unwrap_or_else(|| "undated".into())
}

fn condition(cx: &Ctx, c: &ConditionRule, policy: NoRecords) -> NodeResult {
    let end = cx.as_of.end();
    let matches =
        |f: &&crate::facts::ConditionFact| f.sets.iter().any(|s| c.sets.contains(s)) && !f.sets.iter().any(|s| c.except.contains(s));
    // Gathered only to explain: an outcome is reached without building the list (for every
    // condition rule of every trial and patient).
    let matching = || cx.facts.conditions.iter().filter(matches).collect::<Vec<_>>();
    let window = c.within.map(|s| Window::lookback(s, cx.as_of));
    let mut unknown = Vec::new();
    let mut seen = Vec::new();
    for f in cx.facts.conditions.iter().filter(matches) {
        // What the record proves about when it began and ended, as bounds: onset is at or
        // after `on_lo` and before `on_hi` (a partial date is a whole year or month, and it
        // cannot be later than the recordedDate); abatement likewise.
        let on_lo = f.onset.map(|o| o.0);
        let on_hi = match (f.onset, f.recorded) {
            (Some(o), Some(r)) => Some(o.1.min(Instant(r.0 + 1))),
            (Some(o), None) => Some(o.1),
            (None, Some(r)) => Some(Instant(r.0 + 1)),
            (None, None) => None,
        };
        let (ab_lo, ab_hi) = (f.abatement.map(|a| a.0), f.abatement.map(|a| a.1));
        let started = on_lo.is_none_or(|lo| lo < end);
        // Abated by the end of the screening day: Some when the record tells, None when a
        // partial abatement date straddles it.
        let abated = if f.abated_undated || ab_hi.is_some_and(|hi| hi <= end) {
            Some(true)
        } else if ab_lo.is_some_and(|lo| lo < end) {
            None
        } else {
            Some(false)
        };
        // Active now: Some(true/false) when the record says, None when it cannot tell.
        let active_now = match (abated, started) {
            (Some(true), _) | (_, false) => Some(false),
            (None, _) => None,
            (Some(false), true) => match f.clinical.as_deref() {
                None if c.missing_status == MissingStatus::Active => Some(true),
                Some("unrecognised") if c.missing_status == MissingStatus::Active => Some(false),
                None | Some("unrecognised") => None,
                Some(s) => Some(matches!(s, "active" | "recurrence" | "relapse")),
            },
        };
        let no_status = || {
            why!(
                cx,
                "{} ({}) has no usable clinicalStatus, so whether it is active is unknown",
                f.code,
                f.resource
            )
        };
        let ok = if let Some(sp) = c.onset_before {
            let cutoff = sp.before(cx.as_of).end();
            let counts = if c.status == CondStatus::Any { Some(true) } else { active_now };
            let surely_before = on_hi.is_some_and(|hi| hi <= cutoff);
            let surely_after = on_lo.is_some_and(|lo| lo >= cutoff);
            match counts {
                Some(true) if surely_before => true,
                Some(true) if surely_after => false,
                Some(true) => {
                    unknown.push(why!(cx, "{} ({}) has no onset date precise enough to tell", f.code, f.resource));
                    false
                }
                None if !surely_after => {
                    unknown.push(no_status());
                    false
                }
                _ => false,
            }
        } else if let Some(w) = window {
            // Present at some time in the window: active now, or surely began or ended inside it.
            let began_inside = on_lo.is_some_and(|lo| lo >= w.start) && on_hi.is_some_and(|hi| hi <= end);
            let ended_inside = ab_lo.is_some_and(|lo| lo >= w.start) && ab_hi.is_some_and(|hi| hi <= end);
            if active_now == Some(true) || began_inside || ended_inside {
                true
            } else if on_lo.is_some_and(|lo| lo >= end) || ab_hi.is_some_and(|hi| hi <= w.start) {
                false // began after the screening day, or ended before the window
            } else {
                unknown.push(match (active_now, on_hi, f.abatement) {
                    (None, ..) => no_status(),
                    _ if !cx.explain => String::new(),
                    (_, None, None) => format!("{} ({}) is not active and has no dates", f.code, f.resource),
                    (_, Some(hi), None) if hi <= w.start => format!(
                        "{} ({}) began before {} and is not active, but has no end date",
                        f.code,
                        f.resource,
                        w.start.date()
                    ),
                    _ => format!("{} ({}) has dates too imprecise to place it in the window", f.code, f.resource),
                });
                false
            }
        } else {
            match (c.status, active_now) {
                (CondStatus::Any, _) => started,
                (CondStatus::Active, Some(a)) => a,
                (CondStatus::Active, None) => {
                    unknown.push(no_status());
                    false
                }
            }
        };
        if ok {
            seen.push(f);
        }
    }
    let evidence = |fs: &[&crate::facts::ConditionFact]| -> Vec<Evidence> {
        fs.iter()
            .map(|f| Evidence {
                date: f.onset.map(|o| o.0).or(f.recorded).map(|t| t.to_string()),
                code: Some(f.code.clone()),
                note: Some(format!(
                    "clinicalStatus {}{}",
                    f.clinical.as_deref().unwrap_or("absent"),
                    f.abatement.map(|a| format!(", abated {}", a.0.date())).unwrap_or_default()
                )),
                ..Evidence::of(&f.resource)
            })
            .collect()
    };
    let names = || set_names(cx, &c.sets);
    let qualifier = || match (c.onset_before, c.within, c.status) {
        (Some(s), _, _) => format!("diagnosed at least {s} before {}", cx.as_of),
        (None, Some(s), _) => format!("present within {s} of {}", cx.as_of),
        (None, None, CondStatus::Active) => "active".into(),
        (None, None, CondStatus::Any) => "recorded".into(),
    };
    if !seen.is_empty() {
        let why = cx.say(|| {
            format!(
                "{} {}: {}",
                names(),
                qualifier(),
                seen.iter()
                    .map(|f| format!(
                        "{} ({}, since {})",
                        f.code,
                        f.resource,
                        fmt_time(f.onset.map(|o| o.0).or(f.recorded))
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return NodeResult::new(Outcome::Met, why).with_evidence(cx, || evidence(&seen));
    }
    if !unknown.is_empty() {
        let why = why!(cx, "{}: {}", names(), unknown.join("; "));
        return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || evidence(&matching()));
    }
    none_recorded(cx, "Condition records", cx.facts.present.conditions, policy, || {
        let matching = matching();
        if matching.is_empty() {
            format!("no {} condition recorded", names())
        } else {
            format!(
                "no {} condition {} ({} recorded, none qualifies)",
                names(),
                qualifier(),
                matching.len()
            )
        }
    })
    .with_evidence(cx, || evidence(&matching()))
}

fn medication(cx: &Ctx, m: &MedicationRule, policy: NoRecords) -> NodeResult {
    let window = m.within.map(|s| Window::lookback(s, cx.as_of));
    let today = Window {
        start: cx.as_of.start(),
        end: cx.as_of.end(),
    };
    let mut hits = Vec::new();
    let mut unknown = Vec::new();
    for f in cx.facts.medications.iter().filter(|f| f.sets.iter().any(|s| m.sets.contains(s))) {
        match m.route {
            Some(RouteFilter::Only(route)) => {
                if f.routes.is_empty() {
                    unknown.push(why!(cx, "{} ({}) has no route", f.code, f.resource));
                    continue;
                }
                if !f.routes.contains(&route) {
                    continue;
                }
            }
            // Systemic unless the record says local: most exposures carry no route at all.
            Some(RouteFilter::NotLocal(local)) if f.routes.contains(&local) => continue,
            _ => {}
        }
        if m.total_dose.is_some() && f.source != MedSource::Administration {
            continue;
        }
        let Some(start) = f.start else {
            unknown.push(why!(cx, "{} ({}) is undated", f.code, f.resource));
            continue;
        };
        let end = if f.ongoing { None } else { Some(f.end.unwrap_or(start)) };
        let in_scope = match (m.current, window) {
            (true, _) => !f.finished && today.overlaps(start, end),
            (false, Some(w)) => w.overlaps(start, end),
            (false, None) => start < cx.as_of.end(),
        };
        if in_scope {
            hits.push(f);
        }
    }
    let evidence = || -> Vec<Evidence> {
        hits.iter()
            .map(|f| Evidence {
                date: f.start.map(|t| t.to_string()),
                code: Some(f.code.clone()),
                value: f.dose_text.clone().map(serde_json::Value::from),
                normalized_value: f.dose_g,
                normalized_unit: f.dose_g.map(|_| "g".to_string()),
                note: Some(match (f.ongoing, f.end) {
                    (true, _) => "ongoing".to_string(),
                    (false, Some(e)) => format!("until {}", e.date()),
                    (false, None) => "single date".to_string(),
                }),
                ..Evidence::of(&f.resource)
            })
            .collect()
    };
    let names = || set_names(cx, &m.sets);
    let scope = || match (m.current, m.within) {
        (true, _) => format!("current on {}", cx.as_of),
        (false, Some(s)) => format!("within {s} of {}", cx.as_of),
        (false, None) => "ever".into(),
    };
    let route = || match m.route {
        Some(RouteFilter::Only(r)) => format!(" ({})", cx.m.sets[r].name),
        Some(RouteFilter::NotLocal(_)) => " (systemic)".to_string(),
        None => String::new(),
    };
    if let Some((min, max, unit)) = &m.total_dose {
        let mut total = 0.0;
        for f in &hits {
            match f.dose_g {
                Some(g) => total += g,
                None => unknown.push(why!(cx, "{} ({}) has no usable dose", f.code, f.resource)),
            }
        }
        if !unknown.is_empty() {
            let why = why!(cx, "{}{}: {}", names(), route(), unknown.join("; "));
            return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, evidence);
        }
        let factor = cx.m.dose_factor(unit).map(|f| f.apply(1.0)).unwrap_or(1.0);
        let lo = min.map(|x| x * factor);
        let hi = max.map(|x| x * factor);
        let ok = !hits.is_empty() && lo.is_none_or(|lo| total >= lo) && hi.is_none_or(|hi| total <= hi);
        let reason = || {
            let required = match (min, max) {
                (Some(lo), Some(hi)) => format!("{}–{} {unit}", fmt_num(*lo), fmt_num(*hi)),
                (Some(lo), None) => format!("at least {} {unit}", fmt_num(*lo)),
                (None, Some(hi)) => format!("at most {} {unit}", fmt_num(*hi)),
                (None, None) => "any total".to_string(),
            };
            format!(
                "{}{} {}: {} administration(s), total {} g (required {required})",
                names(),
                route(),
                scope(),
                hits.len(),
                fmt_num(total)
            )
        };
        let r = if hits.is_empty() {
            none_recorded(cx, "medication records", cx.facts.present.medications, policy, reason)
        } else {
            NodeResult::new(if ok { Outcome::Met } else { Outcome::NotMet }, cx.say(reason))
        };
        return r.with_evidence(cx, evidence);
    }
    if !hits.is_empty() {
        let why = cx.say(|| {
            format!(
                "{}{} {}: {}",
                names(),
                route(),
                scope(),
                hits.iter()
                    .map(|f| format!("{} ({})", f.code, f.resource))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return NodeResult::new(Outcome::Met, why).with_evidence(cx, evidence);
    }
    if !unknown.is_empty() {
        return NodeResult::new(Outcome::Unknown, why!(cx, "{}{}: {}", names(), route(), unknown.join("; ")));
    }
    none_recorded(cx, "medication records", cx.facts.present.medications, policy, || {
        format!("no {}{} {}", names(), route(), scope())
    })
}

fn event(cx: &Ctx, kind: EventKind, sets: &[usize], within: Option<Span>, policy: NoRecords) -> NodeResult {
    let (list, present, what) = match kind {
        EventKind::Procedure => (&cx.facts.procedures, cx.facts.present.procedures, "Procedure records"),
        EventKind::Immunization => (&cx.facts.immunizations, cx.facts.present.immunizations, "Immunization records"),
    };
    let window = within.map(|s| Window::lookback(s, cx.as_of));
    let mut hits = Vec::new();
    let mut undated = Vec::new();
    for f in list.iter().filter(|f| f.sets.iter().any(|s| sets.contains(s))) {
        let Some(t) = f.time else {
            // Undated: it happened, but it cannot be placed in a window.
            if window.is_none() {
                hits.push(f);
            } else {
                undated.push(f);
            }
            continue;
        };
        let ok = match window {
            Some(w) => w.overlaps(t, Some(f.end.unwrap_or(t))),
            None => t < cx.as_of.end(),
        };
        if ok {
            hits.push(f);
        }
    }
    let names = || set_names(cx, sets);
    let scope = || {
        within
            .map(|s| format!("within {s} of {}", cx.as_of))
            .unwrap_or_else(|| "ever".into())
    };
    let ev = |fs: &[&crate::facts::EventFact]| {
        fs.iter()
            .map(|f| Evidence {
                date: f.time.map(|t| t.to_string()),
                code: Some(f.code.clone()),
                ..Evidence::of(&f.resource)
            })
            .collect::<Vec<_>>()
    };
    if !hits.is_empty() {
        let why = cx.say(|| {
            format!(
                "{} {}: {}",
                names(),
                scope(),
                hits.iter()
                    .map(|f| format!("{} on {} ({})", f.code, fmt_time(f.time), f.resource))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return NodeResult::new(Outcome::Met, why).with_evidence(cx, || ev(&hits));
    }
    if !undated.is_empty() && within.is_some() {
        let why = why!(cx, "{}: {} record(s) without a usable date", names(), undated.len());
        return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || ev(&undated));
    }
    none_recorded(cx, what, present, policy, || format!("no {} {}", names(), scope()))
}

fn allergy(cx: &Ctx, sets: &[usize], policy: NoRecords) -> NodeResult {
    let names = || set_names(cx, sets);
    let hits: Vec<_> = cx
        .facts
        .allergies
        .iter()
        .filter(|a| a.sets.iter().any(|s| sets.contains(s)))
        .collect();
    if hits.is_empty() {
        return none_recorded(cx, "AllergyIntolerance records", cx.facts.present.allergies, policy, || {
            format!("no active allergy to {} recorded", names())
        });
    }
    let why = cx.say(|| {
        format!(
            "allergy to {}: {}",
            names(),
            hits.iter()
                .map(|a| format!("{} ({})", a.code, a.resource))
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    NodeResult::new(Outcome::Met, why).with_evidence(cx, || {
        hits.iter()
            .map(|a| Evidence {
                code: Some(a.code.clone()),
                ..Evidence::of(&a.resource)
            })
            .collect()
    })
}

fn biopsy(cx: &Ctx, kind: &str, within: Option<Span>, classes: &[String], without: &[String]) -> NodeResult {
    let window = within.map(|s| Window::lookback(s, cx.as_of));
    let scope = || {
        within
            .map(|s| format!("within {s} of {}", cx.as_of))
            .unwrap_or_else(|| "ever".into())
    };
    let all: Vec<_> = cx.facts.biopsies.iter().filter(|b| b.kind == kind).collect();
    let in_window: Vec<_> = all
        .iter()
        .copied()
        .filter(|b| b.time.is_some_and(|t| window.is_none_or(|w| w.contains(t)) && t < cx.as_of.end()))
        .collect();
    let ev = |bs: &[&crate::facts::BiopsyFact]| {
        bs.iter()
            .map(|b| Evidence {
                date: b.time.map(|t| t.to_string()),
                note: Some(if b.classes.is_empty() {
                    "class not coded".into()
                } else {
                    format!("class {}", b.classes.join("+"))
                }),
                ..Evidence::of(&b.resource)
            })
            .collect::<Vec<_>>()
    };
    if in_window.is_empty() {
        let why = cx.say(|| match all.iter().filter_map(|b| b.time).max() {
            Some(t) => format!("no {kind} biopsy {} (latest recorded {})", scope(), t.date()),
            None => format!("no {kind} biopsy recorded"),
        });
        return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || ev(&all));
    }
    if classes.is_empty() && without.is_empty() {
        let why = cx.say(|| {
            format!(
                "{kind} biopsy {}: {}",
                scope(),
                in_window
                    .iter()
                    .map(|b| format!("{} on {}", b.resource, fmt_time(b.time)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return NodeResult::new(Outcome::Met, why).with_evidence(cx, || ev(&in_window));
    }
    // The most recent classed biopsy in the window is the one that describes the disease now.
    let Some(b) = in_window.iter().copied().filter(|b| !b.classes.is_empty()).max_by_key(|b| b.time) else {
        let why = why!(
            cx,
            "{kind} biopsy {} found, but its class is not coded (read the pathology report)",
            scope()
        );
        return NodeResult::new(Outcome::Unknown, why).with_evidence(cx, || ev(&in_window));
    };
    let has = classes.is_empty() || b.classes.iter().any(|c| classes.contains(c));
    let lacks = !b.classes.iter().any(|c| without.contains(c));
    let why = cx.say(|| {
        let mut want = String::new();
        if !classes.is_empty() {
            want = format!("class {}", classes.join("/"));
        }
        if !without.is_empty() {
            want = format!("{want} without {}", without.join("/"));
        }
        format!(
            "{kind} biopsy on {} shows class {} (required {})",
            fmt_time(b.time),
            b.classes.join("+"),
            want.trim()
        )
    });
    NodeResult::new(if has && lacks { Outcome::Met } else { Outcome::NotMet }, why).with_evidence(cx, || ev(&[b]))
}

/// One criterion's result as reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CriterionResult {
    pub id: super::Id,
    pub kind: Kind,
    pub text: String,
    pub outcome: Outcome,
    pub reason: String,
    pub evidence: Vec<Evidence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Boxed: rarely present, and inline it would nearly double the size of every
    /// criterion's result (232 bytes instead of 136; a screening makes millions of them).
    pub decision: Option<Box<super::decisions::Applied>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decider {
    pub id: super::Id,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    pub patient: String,
    /// Name and MRN when the Patient carries them (for staff; never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<crate::facts::Person>,
    pub trial: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    pub decided_by: Vec<Decider>,
    pub criteria: Vec<CriterionResult>,
    pub facts: Vec<FactOut>,
}

/// Evaluates every criterion of `trial` for one patient. With [`Detail::Outcome`] the result
/// holds the same outcomes, status and deciders, without the explanations (see [`Detail`]).
pub fn evaluate(
    trial: &Trial,
    facts: &PatientFacts,
    m: &Mappings,
    as_of: Date,
    decisions: &super::decisions::Decisions,
    detail: Detail,
) -> TrialResult {
    let explain = detail == Detail::Full;
    let cx = Ctx { facts, m, as_of, explain };
    let mut criteria = Vec::with_capacity(trial.criteria.len());
    let mut all_facts: Vec<FactOut> = Vec::new();
    for c in &trial.criteria {
        let mut r = match &c.decide {
            Decide::Manual(reason) => NodeResult::new(Outcome::Manual, cx.say(|| reason.clone())),
            Decide::Rule(node) => eval_node(&cx, node),
        };
        if let Some(why) = &c.suspect {
            r.set_reason(why!(
                cx,
                "as written the rule gives {}: {}; but {why}",
                r.outcome.as_str(),
                r.reason()
            ));
            r.outcome = Outcome::Manual;
        }
        let outcome = r.outcome;
        let Why {
            reason,
            evidence,
            facts: found,
        } = r.into_why();
        let mut result = CriterionResult {
            id: c.id,
            kind: c.kind,
            text: cx.say(|| c.text.clone()),
            outcome,
            reason,
            evidence,
            note: if explain { c.note.clone() } else { None },
            decision: None,
        };
        if matches!(result.outcome, Outcome::Manual | Outcome::Unknown) {
            if let Some(d) = decisions.find(&facts.key, &trial.id, &c.id, as_of) {
                result.reason = why!(cx, "{} (computed: {}; {})", d.reason(), result.outcome.as_str(), result.reason);
                result.outcome = d.answer;
                result.decision = Some(Box::new(d.applied()));
            }
        }
        for f in found {
            if !all_facts.contains(&f) {
                all_facts.push(f);
            }
        }
        criteria.push(result);
    }
    let deciding = |c: &&CriterionResult| {
        (c.kind == Kind::Inclusion && c.outcome == Outcome::NotMet) || (c.kind == Kind::Exclusion && c.outcome == Outcome::Met)
    };
    let all_clear = criteria.iter().all(|c| match c.kind {
        Kind::Inclusion => c.outcome == Outcome::Met,
        Kind::Exclusion => c.outcome == Outcome::NotMet,
    });
    let d = &facts.demographics;
    // A death dated after the screening date did not stop the patient being screened then.
    // The record's reason is kept at every detail: the CSV prints it.
    let record = d
        .deceased
        .as_ref()
        .filter(|x| x.when.is_none_or(|t| t < as_of.end()))
        .map(|x| x.text.clone())
        .or_else(|| d.replaced_by.as_ref().map(|r| format!("merged: replaced by {r}")))
        .or_else(|| d.inactive.then(|| "inactive record (Patient.active is false)".to_string()));
    let decided_by: Vec<Decider> = criteria
        .iter()
        .filter(deciding)
        .map(|c| Decider {
            id: c.id,
            text: cx.say(|| c.text.clone()),
        })
        .collect();
    let status = if record.is_some() || !decided_by.is_empty() {
        Status::Ineligible
    } else if all_clear {
        Status::Eligible
    } else {
        Status::PotentiallyEligible
    };
    TrialResult {
        patient: facts.key.clone(),
        person: if explain { d.person.clone() } else { None },
        trial: trial.id.clone(),
        status,
        record,
        decided_by,
        criteria,
        facts: all_facts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(value: f64, bound: Option<Bound>) -> Bounded {
        Bounded { value, bound }
    }

    /// The comparator table of shared/bench/README.md.
    #[test]
    fn bounds_decide_only_when_definite() {
        use Bound::*;
        assert_eq!(compare(b(90.0, Some(AtLeast)), Op::Le, 45.0), Some(false)); // eGFR >90 -> E1 false
        assert_eq!(compare(b(0.1, Some(AtMost)), Op::Ge, 1.5), Some(false)); // UPCR <0.1 -> I3 false
        assert_eq!(compare(b(2.0, Some(AtMost)), Op::Ge, 1.5), None); // UPCR <2 -> unknown
        assert_eq!(compare(b(45.0, Some(AtLeast)), Op::Le, 45.0), None); // eGFR >45 -> unknown
        assert_eq!(compare(b(1.5, Some(AtLeast)), Op::Ge, 1.5), Some(true));
        assert_eq!(compare(b(40.0, Some(AtMost)), Op::Lt, 50.0), Some(true));
        assert_eq!(compare(b(50.0, Some(AtMost)), Op::Lt, 50.0), None);
        assert_eq!(compare(b(60.0, Some(AtLeast)), Op::Lt, 50.0), Some(false));
        assert_eq!(compare(b(45.0, None), Op::Le, 45.0), Some(true));
        assert_eq!(compare(b(45.0, None), Op::Lt, 45.0), Some(false));
    }
}
