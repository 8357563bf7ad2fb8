//! FHIR topic-based Subscription notifications, in the three shapes servers send: R4 with the
//! Subscriptions R5 Backport (a `history` Bundle whose first entry is a `Parameters`), R4B (a
//! `history` Bundle whose first entry is a `SubscriptionStatus`) and R5 (a
//! `subscription-notification` Bundle, `SubscriptionStatus` first). Each is read into one
//! `Notification`: what kind it is, the event numbers (to find gaps), and which resources
//! changed, with the resource itself when the payload is `full-resource`.
//!
//! Pure reading: no I/O. `serve` decides what to fetch and whom to screen again.

use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl Kind {
    fn parse(code: &str) -> Option<Kind> {
        Some(match code {
            "handshake" => Kind::Handshake,
            "heartbeat" => Kind::Heartbeat,
            "event-notification" => Kind::EventNotification,
            "query-status" => Kind::QueryStatus,
            "query-event" => Kind::QueryEvent,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Handshake => "handshake",
            Kind::Heartbeat => "heartbeat",
            Kind::EventNotification => "event-notification",
            Kind::QueryStatus => "query-status",
            Kind::QueryEvent => "query-event",
        }
    }
}

/// Which FHIR version's shape the notification came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    R4Backport,
    R4B,
    R5,
}

/// One triggering event: its number and the resource it is about (`Type/id`, relative).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub number: Option<u64>,
    pub focus: Option<String>,
    pub timestamp: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Notification {
    pub shape: Shape,
    pub kind: Kind,
    /// The Subscription's reference as sent (`Subscription/x`, maybe absolute).
    pub subscription: Option<String>,
    pub topic: Option<String>,
    /// How many events the subscription has triggered so far, by the server's count.
    pub events_since_start: Option<u64>,
    pub events: Vec<Event>,
    /// The resources sent whole (`full-resource` payloads), without the status resource.
    pub resources: Vec<Value>,
    /// Resources named by an entry without the resource itself (`id-only` payloads).
    pub named: Vec<String>,
}

impl Notification {
    /// The Subscription's logical id, from its reference.
    pub fn subscription_id(&self) -> Option<&str> {
        let r = self.subscription.as_deref()?;
        let r = r.split("/_history/").next()?;
        let (kind, id) = r.rsplit_once('/').map(|(k, id)| (k.rsplit('/').next().unwrap_or(k), id))?;
        (kind == "Subscription" && !id.is_empty()).then_some(id)
    }

    /// The event numbers this notification carries, highest first absent.
    pub fn highest_event(&self) -> Option<u64> {
        self.events.iter().filter_map(|e| e.number).max()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotifyError {
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(String),
}

fn shape_err(s: impl Into<String>) -> NotifyError {
    NotifyError::Shape(s.into())
}

/// `Type/id` from a reference or a full URL (`https://x/fhir/Observation/1/_history/2`).
pub fn relative(reference: &str) -> Option<String> {
    let r = reference.split("/_history/").next()?.trim_end_matches('/');
    let mut parts = r.rsplit('/');
    let id = parts.next()?;
    let kind = parts.next()?;
    let well_formed = kind.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && !id.is_empty();
    well_formed.then(|| format!("{kind}/{id}"))
}

/// An integer64 or an unsignedInt: JSON number, or a string of digits (R4's `string`).
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn reference(v: &Value) -> Option<String> {
    v.get("reference").and_then(Value::as_str).map(str::to_string)
}

pub fn parse(body: &[u8]) -> Result<Notification, NotifyError> {
    let bundle: Value = serde_json::from_slice(body).map_err(|e| NotifyError::Json(e.to_string()))?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(shape_err(
            "a notification is a Bundle (type history, or subscription-notification in R5) whose first entry is the subscription status",
        ));
    }
    let entries = bundle.get("entry").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let Some(status) = entries.first().and_then(|e| e.get("resource")) else {
        return Err(shape_err(
            "the notification Bundle has no entries: its first entry must be the subscription status",
        ));
    };
    let kind_of = |code: Option<&str>| -> Result<Kind, NotifyError> {
        let code = code.ok_or_else(|| shape_err("the subscription status has no type (handshake, heartbeat, event-notification...)"))?;
        Kind::parse(code).ok_or_else(|| shape_err(format!("unknown notification type `{code}`")))
    };
    let mut n = match status.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => {
            let params = status
                .get("parameter")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            fn named<'a>(params: &'a [Value], name: &'a str) -> impl Iterator<Item = &'a Value> {
                params.iter().filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
            }
            let value = |p: &Value, keys: &[&str]| keys.iter().find_map(|k| p.get(*k)).cloned();
            let first = |name: &str, keys: &[&str]| named(params, name).next().and_then(|p| value(p, keys));
            let code = first("type", &["valueCode"]);
            let events = named(params, "notification-event")
                .map(|p| {
                    let parts = p.get("part").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                    let part = |name: &str| parts.iter().find(|q| q.get("name").and_then(Value::as_str) == Some(name));
                    Event {
                        number: part("event-number")
                            .and_then(|q| value(q, &["valueString", "valueInteger64", "valueUnsignedInt", "valueInteger"]))
                            .as_ref()
                            .and_then(number),
                        focus: part("focus").and_then(|q| q.get("valueReference")).and_then(reference),
                        timestamp: part("timestamp")
                            .and_then(|q| q.get("valueInstant"))
                            .and_then(Value::as_str)
                            .map(str::to_string),
                    }
                })
                .collect();
            Notification {
                shape: Shape::R4Backport,
                kind: kind_of(code.as_ref().and_then(Value::as_str))?,
                subscription: first("subscription", &["valueReference"]).as_ref().and_then(reference),
                topic: first("topic", &["valueCanonical", "valueUri"]).and_then(|v| v.as_str().map(str::to_string)),
                events_since_start: first(
                    "events-since-subscription-start",
                    &["valueString", "valueInteger64", "valueUnsignedInt", "valueInteger"],
                )
                .as_ref()
                .and_then(number),
                events,
                resources: Vec::new(),
                named: Vec::new(),
            }
        }
        Some("SubscriptionStatus") => {
            let shape = if bundle.get("type").and_then(Value::as_str) == Some("subscription-notification") {
                Shape::R5
            } else {
                Shape::R4B
            };
            let events = status
                .get("notificationEvent")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|e| Event {
                    number: e.get("eventNumber").and_then(number),
                    focus: e.get("focus").and_then(reference),
                    timestamp: e.get("timestamp").and_then(Value::as_str).map(str::to_string),
                })
                .collect();
            Notification {
                shape,
                kind: kind_of(status.get("type").and_then(Value::as_str))?,
                subscription: status.get("subscription").and_then(reference),
                topic: status.get("topic").and_then(Value::as_str).map(str::to_string),
                events_since_start: status.get("eventsSinceSubscriptionStart").and_then(number),
                events,
                resources: Vec::new(),
                named: Vec::new(),
            }
        }
        other => {
            return Err(shape_err(format!(
                "the first entry is {}, not the subscription status (Parameters in R4, SubscriptionStatus in R4B and R5)",
                other.unwrap_or("not a resource")
            )));
        }
    };
    for e in &entries[1..] {
        match e.get("resource") {
            Some(r) if r.is_object() => n.resources.push(r.clone()),
            _ => {
                let url = e.get("fullUrl").and_then(Value::as_str);
                let from_request = e.get("request").and_then(|r| r.get("url")).and_then(Value::as_str);
                if let Some(name) = url.or(from_request).and_then(relative) {
                    n.named.push(name);
                }
            }
        }
    }
    Ok(n)
}

/// The patient a resource is about: `subject` or `patient`, or the Patient itself.
pub fn patient_of(resource: &Value) -> Option<String> {
    let kind = resource.get("resourceType").and_then(Value::as_str)?;
    if kind == "Patient" {
        return resource.get("id").and_then(Value::as_str).map(str::to_string);
    }
    let r = ["subject", "patient"]
        .iter()
        .find_map(|k| resource.get(*k).and_then(|s| s.get("reference")).and_then(Value::as_str))?;
    let rel = relative(r)?;
    rel.strip_prefix("Patient/").map(str::to_string)
}

/// A notification event range that was never received: from the last event seen (exclusive)
/// to the first of this notification (exclusive), or to the server's count for a heartbeat.
pub fn gap(last_seen: Option<u64>, n: &Notification) -> Option<(u64, u64)> {
    let last = last_seen?;
    let next = match n.kind {
        Kind::EventNotification | Kind::QueryEvent => n.events.iter().filter_map(|e| e.number).min()?,
        // A heartbeat carries the count so far: everything up to it should have come.
        Kind::Heartbeat => n.events_since_start? + 1,
        _ => return None,
    };
    (next > last + 1).then_some((last + 1, next - 1))
}

/// The Subscriptions R5 Backport's extension base.
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// What `trialgate subscribe` asks the server for: an R4 Subscription (Backport profile) to a
/// topic, posting to trialgate's `/notify`.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The server's SubscriptionTopic canonical URL.
    pub topic: String,
    /// Where notifications are posted: trialgate's `/notify`.
    pub endpoint: String,
    /// Backport filter criteria, e.g. `Observation?code=http://loinc.org|98979-8`.
    pub filters: Vec<String>,
    /// `id-only` (the default: no clinical data in transit), `full-resource` or `empty`.
    pub content: String,
    /// Seconds between heartbeats when nothing happens.
    pub heartbeat_secs: u32,
    /// The `Authorization` header the server sends with each notification.
    pub authorization: Option<String>,
}

impl SubscriptionSpec {
    pub fn resource(&self, id: Option<&str>) -> Value {
        let filters: Vec<Value> = self
            .filters
            .iter()
            .map(|f| json!({"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": f}))
            .collect();
        let mut sub = json!({
            "resourceType": "Subscription",
            "meta": {"profile": [format!("{BACKPORT}/backport-subscription")]},
            "status": "requested",
            "reason": "trialgate: screen patients again for clinical trials when their records change",
            "criteria": self.topic,
            "channel": {
                "extension": [
                    {"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": self.heartbeat_secs},
                    {"url": format!("{BACKPORT}/backport-timeout"), "valueUnsignedInt": 30},
                    {"url": format!("{BACKPORT}/backport-max-count"), "valuePositiveInt": 20}
                ],
                "type": "rest-hook",
                "endpoint": self.endpoint,
                "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": self.content}]}
            }
        });
        if !filters.is_empty() {
            sub["_criteria"] = json!({"extension": filters});
        }
        if let Some(h) = &self.authorization {
            sub["channel"]["header"] = json!([format!("Authorization: {h}")]);
        }
        if let Some(id) = id {
            sub["id"] = json!(id);
        }
        sub
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r4(kind: &str, events: &[(u64, &str)], extra: Vec<Value>) -> Vec<u8> {
        let mut params = vec![
            json!({"name": "subscription", "valueReference": {"reference": "https://ehr.example/fhir/Subscription/trialgate"}}),
            json!({"name": "topic", "valueCanonical": "http://example.org/topic/lab-result"}),
            json!({"name": "status", "valueCode": "active"}),
            json!({"name": "type", "valueCode": kind}),
            json!({"name": "events-since-subscription-start", "valueString": events.last().map(|e| e.0).unwrap_or(0).to_string()}),
        ];
        for (n, focus) in events {
            params.push(json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": n.to_string()},
                {"name": "timestamp", "valueInstant": "2026-11-22T10:00:00Z"},
                {"name": "focus", "valueReference": {"reference": focus}}]}));
        }
        let mut entry = vec![json!({"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Parameters", "parameter": params}})];
        entry.extend(extra);
        json!({"resourceType": "Bundle", "type": "history", "entry": entry})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn r4_backport_id_only() {
        let body = r4(
            "event-notification",
            &[(7, "Observation/o1")],
            vec![
                json!({"fullUrl": "https://ehr.example/fhir/Observation/o1/_history/2", "request": {"method": "PUT", "url": "Observation/o1"}}),
            ],
        );
        let n = parse(&body).unwrap();
        assert_eq!((n.shape, n.kind), (Shape::R4Backport, Kind::EventNotification));
        assert_eq!(n.subscription_id(), Some("trialgate"));
        assert_eq!(n.events_since_start, Some(7));
        assert_eq!(n.events[0].number, Some(7));
        assert_eq!(n.events[0].focus.as_deref(), Some("Observation/o1"));
        assert_eq!(n.named, ["Observation/o1"]);
        assert!(n.resources.is_empty());
    }

    #[test]
    fn r4b_and_r5_full_resource() {
        let obs = json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"}});
        for (bundle_type, shape, number) in [
            ("history", Shape::R4B, json!("3")),
            ("subscription-notification", Shape::R5, json!(3)),
        ] {
            let body = json!({"resourceType": "Bundle", "type": bundle_type, "entry": [
                {"resource": {"resourceType": "SubscriptionStatus", "status": "active", "type": "event-notification",
                  "eventsSinceSubscriptionStart": number, "subscription": {"reference": "Subscription/s1"},
                  "notificationEvent": [{"eventNumber": number, "focus": {"reference": "Observation/o1"}}]}},
                {"fullUrl": "Observation/o1", "resource": obs}]});
            let n = parse(body.to_string().as_bytes()).unwrap();
            assert_eq!(n.shape, shape);
            assert_eq!(n.highest_event(), Some(3));
            assert_eq!(n.resources.len(), 1);
            assert_eq!(patient_of(&n.resources[0]).as_deref(), Some("p1"));
            assert_eq!(n.subscription_id(), Some("s1"));
        }
    }

    #[test]
    fn handshakes_heartbeats_and_gaps() {
        let hs = parse(&r4("handshake", &[], vec![])).unwrap();
        assert_eq!(hs.kind, Kind::Handshake);
        assert_eq!(gap(Some(0), &hs), None);
        let ev = parse(&r4("event-notification", &[(5, "Observation/a"), (6, "Observation/b")], vec![])).unwrap();
        assert_eq!(gap(Some(2), &ev), Some((3, 4)));
        assert_eq!(gap(Some(4), &ev), None);
        assert_eq!(gap(None, &ev), None, "nothing seen yet: nothing to repair");
        let mut hb = parse(&r4("heartbeat", &[], vec![])).unwrap();
        hb.events_since_start = Some(9);
        assert_eq!(gap(Some(6), &hb), Some((7, 9)));
        assert_eq!(gap(Some(9), &hb), None);
    }

    #[test]
    fn what_is_refused_and_why() {
        let cases: [(&[u8], &str); 5] = [
            (b"{", "not JSON"),
            (br#"{"resourceType":"Observation"}"#, "is a Bundle"),
            (br#"{"resourceType":"Bundle","type":"history"}"#, "no entries"),
            (
                br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient"}}]}"#,
                "first entry is Patient",
            ),
            (
                br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"SubscriptionStatus","type":"nonsense"}}]}"#,
                "unknown notification type",
            ),
        ];
        for (body, want) in cases {
            let e = parse(body).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_subscription_request_in_the_backport_profile() {
        let spec = SubscriptionSpec {
            topic: "http://example.org/SubscriptionTopic/lab-result".into(),
            endpoint: "https://trialgate.example/notify".into(),
            filters: vec!["Observation?code=http://loinc.org|98979-8".into()],
            content: "id-only".into(),
            heartbeat_secs: 300,
            authorization: Some("Bearer t".into()),
        };
        let s = spec.resource(Some("s1"));
        assert_eq!(s["criteria"], "http://example.org/SubscriptionTopic/lab-result");
        assert_eq!(s["channel"]["type"], "rest-hook");
        assert_eq!(s["channel"]["header"][0], "Authorization: Bearer t");
        assert_eq!(s["channel"]["_payload"]["extension"][0]["valueCode"], "id-only");
        assert_eq!(
            s["_criteria"]["extension"][0]["valueString"],
            "Observation?code=http://loinc.org|98979-8"
        );
        assert_eq!(s["id"], "s1");
        let bare = SubscriptionSpec {
            filters: vec![],
            authorization: None,
            ..spec
        }
        .resource(None);
        assert!(bare.get("_criteria").is_none() && bare["channel"].get("header").is_none() && bare.get("id").is_none());
    }

    #[test]
    fn references_and_patients() {
        assert_eq!(
            relative("https://x/fhir/Observation/1/_history/2").as_deref(),
            Some("Observation/1")
        );
        assert_eq!(relative("Condition/c"), Some("Condition/c".into()));
        assert_eq!(relative("urn:uuid:1234"), None);
        let med = json!({"resourceType": "MedicationRequest", "subject": {"reference": "https://x/fhir/Patient/p9"}});
        assert_eq!(patient_of(&med).as_deref(), Some("p9"));
        let allergy = json!({"resourceType": "AllergyIntolerance", "patient": {"reference": "Patient/p2"}});
        assert_eq!(patient_of(&allergy).as_deref(), Some("p2"));
        assert_eq!(patient_of(&json!({"resourceType": "Patient", "id": "p3"})).as_deref(), Some("p3"));
        assert_eq!(
            patient_of(&json!({"resourceType": "Observation", "subject": {"reference": "Group/g"}})),
            None
        );
    }
}
