//! Converting Threagile and Open Threat Model (OTM) files into a driftwatch model.
//!
//! Neither format names processes, so the converted components match nothing until an overlay
//! adds selectors. The overlay is a YAML file keyed by the ids of the source model:
//!
//! ```yaml
//! zones:       # by Threagile trust boundary id or OTM trust zone id
//!   web-dmz: { trust: 40, cidrs: ["192.0.2.0/24"] }
//! components:  # by Threagile technical asset id or OTM component id
//!   apache-webserver:
//!     match: { exe: ["/usr/sbin/apache2"], unit: ["apache2.service"] }
//!     listens: [{ port: 443 }]
//! flows:       # by Threagile "<asset id>/<link title>" or OTM dataflow id
//!   "load-balancer/Web Application Traffic": { ports: [8080] }
//! ```
//!
//! Overlay keys under `components` are copied into the component as they are, so any component
//! field (`match`, `listens`, `executables`, `exposed`, `criticality`) can be set there. The
//! output is checked with the model loader before it is returned.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::model::Model;

/// The formats `driftwatch model import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    /// Threagile YAML (`technical_assets`, `trust_boundaries`, `communication_links`).
    Threagile,
    /// Open Threat Model, in JSON or YAML.
    Otm,
}

/// A converted model and what the conversion could not carry over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Model YAML that [`Model::parse`] accepts.
    pub yaml: String,
    /// One line per element that was dropped or guessed, for the user to review.
    pub notes: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("failed to parse {source_name}: {reason}")]
    Parse { source_name: String, reason: String },
    #[error("{source_name} is not a {format} model: {reason}")]
    Format {
        source_name: String,
        format: &'static str,
        reason: String,
    },
    #[error("the converted model is invalid (check the overlay):\n{0}")]
    Invalid(String),
}

/// Parses YAML (or JSON, which YAML contains) into a JSON value. Only the first document is read.
///
/// Files written by other tools sometimes continue a quoted scalar on a line indented less than
/// YAML requires (the public OTM example does), which libyaml-based parsers accept and saphyr
/// rejects. When the strict parse fails, such lines are re-indented and the parse is retried.
/// A quoted scalar folds away the leading spaces of its continuation lines, so its value does not
/// change.
///
/// # Errors
/// The parser's message for the text as given when neither parse succeeds.
pub fn yaml_to_json(text: &str) -> Result<Value, String> {
    let documents = match MarkedYaml::load_from_str(text) {
        Ok(documents) => documents,
        Err(strict) => MarkedYaml::load_from_str(&indent_quoted_continuations(text))
            .map_err(|_| strict.to_string())?,
    };
    Ok(documents.first().map_or(Value::Null, node_to_json))
}

/// Indents each continuation line of a multi-line quoted scalar at least as far as the line the
/// scalar starts on.
fn indent_quoted_continuations(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    // The open quote character and the indentation its continuation lines need.
    let mut open: Option<(char, usize)> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let mut rest = line;
        if let Some((quote, needed)) = open {
            if indent < needed && !line.trim().is_empty() {
                out.push_str(&" ".repeat(needed - indent));
            }
            if let Some(end) = closing_quote(rest, quote) {
                rest = &rest[end + 1..];
                open = None;
            } else {
                rest = "";
            }
        }
        if open.is_none() {
            open = unclosed_quote(rest).map(|quote| (quote, indent));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Returns the quote character of a quoted value that starts on this text and is not closed on
/// it. Only a quote at the start of the text or after `: ` or `- ` opens a scalar.
fn unclosed_quote(text: &str) -> Option<char> {
    let trimmed = text.trim_start();
    let start = if trimmed.starts_with(['\'', '"']) {
        text.len() - trimmed.len()
    } else {
        let colon = text
            .find(": ")
            .map(|i| i + 2)
            .or_else(|| text.find("- ").map(|i| i + 2))?;
        let after = &text[colon..];
        colon + (after.len() - after.trim_start().len())
    };
    let quote = text[start..]
        .chars()
        .next()
        .filter(|c| *c == '\'' || *c == '"')?;
    let body = &text[start + 1..];
    closing_quote(body, quote).is_none().then_some(quote)
}

/// Finds the byte offset of the quote that closes a scalar, skipping `''` in single-quoted text
/// and backslash escapes in double-quoted text.
fn closing_quote(text: &str, quote: char) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match (quote, bytes[i]) {
            ('"', b'\\') => i += 1,
            ('\'', b'\'') if bytes.get(i + 1) == Some(&b'\'') => i += 1,
            (_, b) if b == quote as u8 => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn node_to_json(node: &MarkedYaml<'_>) -> Value {
    match &node.data {
        YamlData::Value(Scalar::String(s)) => Value::String(s.to_string()),
        YamlData::Value(Scalar::Integer(i)) => Value::from(*i),
        YamlData::Value(Scalar::FloatingPoint(f)) => Value::from(f.into_inner()),
        YamlData::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        YamlData::Sequence(items) => Value::Array(items.iter().map(node_to_json).collect()),
        YamlData::Mapping(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                let key = match node_to_json(key) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, node_to_json(value));
            }
            Value::Object(map)
        }
        YamlData::Tagged(_, inner) => node_to_json(inner),
        _ => Value::Null,
    }
}

/// Converts a Threagile or OTM model, with an optional selector overlay, into model YAML.
///
/// # Errors
/// The input or overlay does not parse, lacks the sections of its format, or the result does
/// not load as a model.
pub fn import(
    format: ImportFormat,
    text: &str,
    source_name: &str,
    overlay: Option<&str>,
) -> Result<Imported, ImportError> {
    let parse_error = |name: &str, reason: String| ImportError::Parse {
        source_name: name.to_owned(),
        reason,
    };
    let document = yaml_to_json(text).map_err(|e| parse_error(source_name, e))?;
    let overlay = match overlay {
        Some(text) => yaml_to_json(text).map_err(|e| parse_error("the overlay", e))?,
        None => Value::Null,
    };
    let draft = match format {
        ImportFormat::Threagile => threagile(&document, source_name)?,
        ImportFormat::Otm => otm(&document, source_name)?,
    };
    let imported = draft.render(&overlay, source_name);
    Model::parse(&imported.yaml, "the converted model")
        .map_err(|errors| ImportError::Invalid(errors.to_string()))?;
    Ok(imported)
}

/// A model under construction, keyed by the source ids so the overlay can find its entries.
#[derive(Default)]
struct Draft {
    format: &'static str,
    zones: Vec<DraftZone>,
    components: Vec<DraftComponent>,
    flows: Vec<DraftFlow>,
    notes: Vec<String>,
}

struct DraftZone {
    source_id: String,
    id: String,
    trust: u8,
    parent: Option<String>,
    cidrs: Vec<String>,
    description: Option<String>,
}

struct DraftComponent {
    id: String,
    zone: String,
    exposed: bool,
    criticality: &'static str,
    data: Vec<String>,
    description: Option<String>,
}

struct DraftFlow {
    /// The overlay key.
    key: String,
    from: String,
    to: String,
    /// Guessed from the protocol name; the overlay may replace it.
    ports: Vec<u16>,
    both: bool,
    description: Option<String>,
}

const INTERNET_ZONE: &str = "internet";
const DEFAULT_ZONE: &str = "unzoned";

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn strings(value: &Value, key: &str) -> Vec<String> {
    value
        .get(key)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Turns a display name into an id: lower case, runs of other characters as one `-`.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// Well-known server ports of the protocol names Threagile uses.
fn default_port(protocol: &str) -> Option<u16> {
    let port = match protocol {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        "ssh" | "sftp" | "scp" => 22,
        "ldap" => 389,
        "ldaps" => 636,
        "ftp" => 21,
        "smtp" => 25,
        "smtp-encrypted" => 465,
        "pop3" => 110,
        "pop3-encrypted" => 995,
        "imap" => 143,
        "imap-encrypted" => 993,
        "mqtt" => 1883,
        "nfs" => 2049,
        "smb" => 445,
        "jdbc" | "jdbc-encrypted" | "sql-access-protocol" | "sql-access-protocol-encrypted" => {
            return None
        }
        _ => return None,
    };
    Some(port)
}

/// Maps Threagile's five-step rating (archive .. mission-critical, public .. strictly-confidential).
fn threagile_level(value: &str) -> u8 {
    match value {
        "archive" | "public" => 0,
        "operational" | "internal" => 1,
        "important" | "restricted" => 2,
        "confidential" | "critical" => 3,
        "mission-critical" | "strictly-confidential" => 4,
        _ => 1,
    }
}

fn criticality_of_level(level: u8) -> &'static str {
    match level {
        0 => "low",
        1 => "medium",
        2 | 3 => "high",
        _ => "critical",
    }
}

fn threagile(document: &Value, source_name: &str) -> Result<Draft, ImportError> {
    let assets = document
        .get("technical_assets")
        .and_then(Value::as_object)
        .ok_or_else(|| ImportError::Format {
            source_name: source_name.to_owned(),
            format: "Threagile",
            reason: "it has no technical_assets mapping".to_owned(),
        })?;
    let mut draft = Draft {
        format: "Threagile",
        ..Draft::default()
    };

    // Trust boundaries become zones; nesting becomes `parent`.
    let boundaries = document
        .get("trust_boundaries")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut zone_of: BTreeMap<String, String> = BTreeMap::new();
    let mut parent_of: BTreeMap<String, String> = BTreeMap::new();
    for boundary in boundaries.values() {
        let Some(id) = text(boundary, "id") else {
            continue;
        };
        for asset in strings(boundary, "technical_assets_inside") {
            zone_of.insert(asset, id.to_owned());
        }
        for nested in strings(boundary, "trust_boundaries_nested") {
            parent_of.insert(nested, id.to_owned());
        }
    }
    for boundary in boundaries.values() {
        let Some(id) = text(boundary, "id") else {
            continue;
        };
        draft.zones.push(DraftZone {
            source_id: id.to_owned(),
            id: id.to_owned(),
            trust: 50,
            parent: parent_of.get(id).cloned(),
            cidrs: Vec::new(),
            description: text(boundary, "description").map(str::to_owned),
        });
    }

    let on_internet = |asset: &Value| asset.get("internet").and_then(Value::as_bool) == Some(true);
    let mut internet_assets = Vec::new();
    for asset in assets.values() {
        let Some(id) = text(asset, "id") else {
            continue;
        };
        // An external entity on the internet is remote traffic, not a process on a host: its
        // flows start from the internet zone.
        if on_internet(asset) && text(asset, "type") == Some("external-entity") {
            internet_assets.push(id.to_owned());
            draft.notes.push(format!(
                "{id}: an internet client, its links start from zone {INTERNET_ZONE}"
            ));
            continue;
        }
        let level = ["confidentiality", "integrity", "availability"]
            .iter()
            .filter_map(|key| text(asset, key))
            .map(threagile_level)
            .max()
            .unwrap_or(1);
        let mut data = strings(asset, "data_assets_processed");
        for stored in strings(asset, "data_assets_stored") {
            if !data.contains(&stored) {
                data.push(stored);
            }
        }
        let zone = zone_of.get(id).cloned().unwrap_or_else(|| {
            if on_internet(asset) {
                INTERNET_ZONE.to_owned()
            } else {
                DEFAULT_ZONE.to_owned()
            }
        });
        draft.components.push(DraftComponent {
            id: id.to_owned(),
            zone,
            exposed: false,
            criticality: criticality_of_level(level),
            data,
            description: text(asset, "description").map(str::to_owned),
        });
    }

    let entry = |id: &str| {
        if internet_assets.iter().any(|a| a == id) {
            INTERNET_ZONE.to_owned()
        } else {
            id.to_owned()
        }
    };
    for asset in assets.values() {
        let Some(id) = text(asset, "id") else {
            continue;
        };
        let Some(links) = asset.get("communication_links").and_then(Value::as_object) else {
            continue;
        };
        for (title, link) in links {
            let Some(target) = text(link, "target") else {
                continue;
            };
            let protocol = text(link, "protocol").unwrap_or("");
            let key = format!("{id}/{title}");
            draft.flows.push(DraftFlow {
                key,
                from: entry(id),
                to: target.to_owned(),
                ports: default_port(protocol).into_iter().collect(),
                both: false,
                description: Some(format!("{title} ({protocol})")),
            });
        }
    }
    draft.finish_exposure();
    Ok(draft)
}

fn otm(document: &Value, source_name: &str) -> Result<Draft, ImportError> {
    let format_error = |reason: &str| ImportError::Format {
        source_name: source_name.to_owned(),
        format: "OTM",
        reason: reason.to_owned(),
    };
    if document.get("otmVersion").is_none() {
        return Err(format_error("it has no otmVersion"));
    }
    let mut draft = Draft {
        format: "OTM",
        ..Draft::default()
    };

    let mut zone_ids: BTreeMap<String, String> = BTreeMap::new();
    for zone in document
        .get("trustZones")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(source_id) = text(zone, "id") else {
            continue;
        };
        let id = text(zone, "name").map_or_else(|| slug(source_id), slug);
        let trust = zone
            .pointer("/risk/trustRating")
            .and_then(Value::as_u64)
            .map_or(50, |t| t.min(100) as u8);
        let cidrs = if text(zone, "type") == Some("internet") {
            vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()]
        } else {
            Vec::new()
        };
        zone_ids.insert(source_id.to_owned(), id.clone());
        draft.zones.push(DraftZone {
            source_id: source_id.to_owned(),
            id,
            trust,
            parent: None,
            cidrs,
            description: text(zone, "description").map(str::to_owned),
        });
    }
    // A zone nested in another zone names it as `parent.trustZone`.
    for zone in document
        .get("trustZones")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(source_id), Some(parent)) = (
            text(zone, "id"),
            zone.pointer("/parent/trustZone").and_then(Value::as_str),
        ) else {
            continue;
        };
        let parent = zone_ids.get(parent).cloned();
        if let Some(entry) = draft.zones.iter_mut().find(|z| z.source_id == source_id) {
            entry.parent = parent;
        }
    }

    let mut asset_level: BTreeMap<String, u64> = BTreeMap::new();
    for asset in document
        .get("assets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(id) = text(asset, "id") else {
            continue;
        };
        let level = ["confidentiality", "integrity"]
            .iter()
            .filter_map(|key| {
                asset
                    .pointer(&format!("/risk/{key}"))
                    .and_then(Value::as_u64)
            })
            .max()
            .unwrap_or(50);
        asset_level.insert(id.to_owned(), level);
    }

    let components: Vec<&Value> = document
        .get("components")
        .and_then(Value::as_array)
        .ok_or_else(|| format_error("it has no components list"))?
        .iter()
        .collect();
    // A component inside another component takes that component's zone; resolve in rounds so
    // the order of the list does not matter.
    let mut zone_of: BTreeMap<String, String> = BTreeMap::new();
    for _ in 0..=components.len() {
        for component in &components {
            let Some(id) = text(component, "id") else {
                continue;
            };
            let zone = match (
                component
                    .pointer("/parent/trustZone")
                    .and_then(Value::as_str),
                component
                    .pointer("/parent/component")
                    .and_then(Value::as_str),
            ) {
                (Some(zone), _) => zone_ids.get(zone).cloned(),
                (None, Some(parent)) => zone_of.get(parent).cloned(),
                (None, None) => Some(DEFAULT_ZONE.to_owned()),
            };
            if let Some(zone) = zone {
                zone_of.insert(id.to_owned(), zone);
            }
        }
    }
    for component in &components {
        let Some(id) = text(component, "id") else {
            continue;
        };
        let mut data = strings(component.get("assets").unwrap_or(&Value::Null), "processed");
        for stored in strings(component.get("assets").unwrap_or(&Value::Null), "stored") {
            if !data.contains(&stored) {
                data.push(stored);
            }
        }
        let level = data
            .iter()
            .filter_map(|asset| asset_level.get(asset))
            .max()
            .copied();
        let criticality = match level {
            None => "medium",
            Some(0..=24) => "low",
            Some(25..=49) => "medium",
            Some(50..=79) => "high",
            Some(_) => "critical",
        };
        draft.components.push(DraftComponent {
            id: id.to_owned(),
            zone: zone_of
                .get(id)
                .cloned()
                .unwrap_or_else(|| DEFAULT_ZONE.to_owned()),
            exposed: false,
            criticality,
            data,
            description: text(component, "description").map(str::to_owned),
        });
    }

    for flow in document
        .get("dataflows")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(source), Some(destination)) = (
            text(flow, "id"),
            text(flow, "source"),
            text(flow, "destination"),
        ) else {
            continue;
        };
        draft.flows.push(DraftFlow {
            key: id.to_owned(),
            from: source.to_owned(),
            to: destination.to_owned(),
            // OTM data flows carry no port; only the overlay can give one.
            ports: Vec::new(),
            both: flow.get("bidirectional").and_then(Value::as_bool) == Some(true),
            description: text(flow, "name").map(str::to_owned),
        });
    }
    draft.finish_exposure();
    Ok(draft)
}

impl Draft {
    /// Marks as exposed each component that a flow reaches from an untrusted zone (trust below
    /// 25) or from a component in one.
    fn finish_exposure(&mut self) {
        let untrusted: Vec<String> = self
            .zones
            .iter()
            .filter(|z| z.trust < 25)
            .map(|z| z.id.clone())
            .chain([INTERNET_ZONE.to_owned()])
            .collect();
        let outside: Vec<String> = self
            .components
            .iter()
            .filter(|c| untrusted.contains(&c.zone))
            .map(|c| c.id.clone())
            .chain(untrusted.iter().cloned())
            .collect();
        for flow in &self.flows {
            let mut reached = vec![&flow.to];
            if flow.both {
                reached.push(&flow.from);
            }
            let starts_outside =
                outside.contains(&flow.from) || (flow.both && outside.contains(&flow.to));
            if !starts_outside {
                continue;
            }
            for id in reached {
                if let Some(component) = self
                    .components
                    .iter_mut()
                    .find(|c| &c.id == id && !untrusted.contains(&c.zone))
                {
                    component.exposed = true;
                }
            }
        }
    }

    /// Writes the model YAML with the overlay applied.
    fn render(mut self, overlay: &Value, source_name: &str) -> Imported {
        let zone_overlay = overlay.get("zones").cloned().unwrap_or(Value::Null);
        let component_overlay = overlay.get("components").cloned().unwrap_or(Value::Null);
        let flow_overlay = overlay.get("flows").cloned().unwrap_or(Value::Null);

        let needs = |zone: &str, draft: &Draft| {
            !draft.zones.iter().any(|z| z.id == zone)
                && (draft.components.iter().any(|c| c.zone == zone)
                    || draft.flows.iter().any(|f| f.from == zone || f.to == zone))
        };
        if needs(INTERNET_ZONE, &self) {
            self.zones.insert(
                0,
                DraftZone {
                    source_id: INTERNET_ZONE.to_owned(),
                    id: INTERNET_ZONE.to_owned(),
                    trust: 0,
                    parent: None,
                    cidrs: vec!["0.0.0.0/0".to_owned(), "::/0".to_owned()],
                    description: Some(
                        "Added for the assets the source marks as on the internet".to_owned(),
                    ),
                },
            );
        }
        if needs(DEFAULT_ZONE, &self) {
            self.zones.push(DraftZone {
                source_id: DEFAULT_ZONE.to_owned(),
                id: DEFAULT_ZONE.to_owned(),
                trust: 50,
                parent: None,
                cidrs: Vec::new(),
                description: Some("Assets outside every trust boundary of the source".to_owned()),
            });
        }

        let mut out = format!(
            "# Converted from {} model {source_name} by driftwatch model import.\n# Components match no process until they have `match` selectors (from the overlay or by hand).\nversion: 1\n",
            self.format
        );
        out.push_str("zones:\n");
        for zone in &self.zones {
            let extra = zone_overlay.get(&zone.source_id);
            let trust = extra
                .and_then(|e| e.get("trust"))
                .and_then(Value::as_u64)
                .map_or(zone.trust, |t| t.min(100) as u8);
            let _ = writeln!(out, "  - id: {}\n    trust: {trust}", quote(&zone.id));
            if let Some(parent) = &zone.parent {
                let _ = writeln!(out, "    parent: {}", quote(parent));
            }
            let cidrs = extra
                .and_then(|e| e.get("cidrs"))
                .cloned()
                .unwrap_or_else(|| Value::from(zone.cidrs.clone()));
            if cidrs.as_array().is_some_and(|c| !c.is_empty()) {
                let _ = writeln!(out, "    match: {{ cidrs: {cidrs} }}");
            }
            if let Some(description) = &zone.description {
                let _ = writeln!(out, "    description: {}", quote(description.trim()));
            }
        }

        out.push_str("components:\n");
        for component in &self.components {
            let extra = component_overlay
                .get(&component.id)
                .and_then(Value::as_object);
            let mut fields: Vec<(String, String)> = vec![
                ("zone".to_owned(), quote(&component.zone)),
                ("exposed".to_owned(), component.exposed.to_string()),
                ("criticality".to_owned(), component.criticality.to_owned()),
            ];
            if !component.data.is_empty() {
                fields.push((
                    "data".to_owned(),
                    Value::from(component.data.clone()).to_string(),
                ));
            }
            if let Some(description) = &component.description {
                fields.push(("description".to_owned(), quote(description.trim())));
            }
            for (key, value) in extra.into_iter().flatten() {
                let rendered = value.to_string();
                match fields.iter_mut().find(|(k, _)| k == key) {
                    Some(field) => field.1 = rendered,
                    None => fields.push((key.clone(), rendered)),
                }
            }
            if extra.is_none_or(|e| !e.contains_key("match")) {
                self.notes.push(format!(
                    "{}: no selectors in the overlay, so it matches no process",
                    component.id
                ));
            }
            let _ = writeln!(out, "  - id: {}", quote(&component.id));
            for (key, value) in fields {
                let _ = writeln!(out, "    {key}: {value}");
            }
        }

        out.push_str("flows:\n");
        for flow in &self.flows {
            let extra = flow_overlay.get(&flow.key);
            let mut ports: Vec<u16> = flow.ports.clone();
            if let Some(list) = extra.and_then(|e| e.get("ports")).and_then(Value::as_array) {
                ports = list
                    .iter()
                    .filter_map(Value::as_u64)
                    .filter_map(|p| u16::try_from(p).ok())
                    .collect();
            }
            if let Some(port) = extra.and_then(|e| e.get("port")).and_then(Value::as_u64) {
                ports = u16::try_from(port).into_iter().collect();
            }
            ports.retain(|&p| p != 0);
            if ports.is_empty() {
                self.notes.push(format!(
                    "flow \"{}\" ({} -> {}): no port known, left out; give it ports in the overlay",
                    flow.key, flow.from, flow.to
                ));
                continue;
            }
            let mut line = format!(
                "  - {{ from: {}, to: {}, ports: {}",
                quote(&flow.from),
                quote(&flow.to),
                Value::from(ports)
            );
            if let Some(proto) = extra.and_then(|e| e.get("proto")).and_then(Value::as_str) {
                let _ = write!(line, ", proto: {}", quote(proto));
            }
            if flow.both {
                line.push_str(", direction: both");
            }
            if let Some(description) = &flow.description {
                let _ = write!(line, ", description: {}", quote(description.trim()));
            }
            line.push_str(" }\n");
            out.push_str(&line);
        }
        Imported {
            yaml: out,
            notes: self.notes,
        }
    }
}

/// Quotes text as a YAML double-quoted scalar, which JSON string syntax is.
fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_indented_quoted_continuation_is_repaired() {
        let text = "a:\n  b:\n    'one\n    two\n  three'\nc: 1\n";
        let value = yaml_to_json(text).expect("repaired text parses");
        assert_eq!(value["a"]["b"], "one two three");
        assert_eq!(value["c"], 1);
    }

    #[test]
    fn closing_quote_skips_escapes() {
        assert_eq!(closing_quote("it''s' x", '\''), Some(5));
        assert_eq!(closing_quote(r#"a\"b" x"#, '"'), Some(4));
        assert_eq!(closing_quote("open", '"'), None);
    }

    #[test]
    fn slug_joins_words_with_dashes() {
        assert_eq!(slug("Web DMZ"), "web-dmz");
        assert_eq!(slug("  Internet! "), "internet");
    }

    #[test]
    fn default_port_knows_common_protocols() {
        assert_eq!(default_port("https"), Some(443));
        assert_eq!(default_port("ldaps"), Some(636));
        assert_eq!(default_port("jdbc"), None);
    }
}
