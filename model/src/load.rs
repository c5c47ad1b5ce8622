//! Loading a model from YAML (format version 1) with every error located and collected.
//!
//! The loader reads in two passes. The first checks each node's shape and values (types, unknown
//! keys, ranges, globs, CIDRs, dates). The second checks what needs the whole file (unique ids,
//! references between zones, components and flows). Both passes run even when the first found
//! errors, so one run lists everything a reader has to fix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use ipnet::IpNet;
use saphyr::{LoadableYamlNode, MarkedYaml};
use saphyr_parser::Span;

use crate::deviation::Category;
use crate::error::{ModelErrorKind, ModelErrors};
use crate::model::{
    compile_glob, Component, Criticality, Direction, Exception, Flow, GlobList, Listen, Model,
    Selectors, UserSelector, Zone,
};
use crate::observation::Protocol;
use crate::pattern::{parse_date, IdPattern};
use crate::yaml::{position, Fields, Node, Reader};

/// The only model format version this build reads.
pub const MODEL_VERSION: u32 = 1;

const TOP_KEYS: &[&str] = &["version", "zones", "components", "flows", "exceptions"];
const ZONE_KEYS: &[&str] = &["id", "trust", "parent", "match", "description"];
const ZONE_MATCH_KEYS: &[&str] = &["cidrs"];
const COMPONENT_KEYS: &[&str] = &[
    "id",
    "zone",
    "exposed",
    "criticality",
    "match",
    "listens",
    "executables",
    "data",
    "description",
];
const COMPONENT_MATCH_KEYS: &[&str] = &["exe", "cgroup", "user", "unit", "container", "pod"];
const LISTEN_KEYS: &[&str] = &["port", "proto", "address"];
const FLOW_KEYS: &[&str] = &[
    "from",
    "to",
    "port",
    "ports",
    "proto",
    "direction",
    "deny",
    "description",
];
const EXCEPTION_KEYS: &[&str] = &["id", "reason", "expires"];

/// An id as written, with where it was written.
struct Located {
    text: String,
    span: Span,
    path: String,
}

/// Largest model file `Model::load` reads: far beyond any hand-written model.
pub const MAX_MODEL_BYTES: u64 = 16 * 1024 * 1024;

/// The output of the first pass: the values that were valid, plus every id and reference that
/// could be read. The second pass checks the ids even of items with other errors, so that one bad
/// field does not also make every reference to its item look dangling.
#[derive(Default)]
struct Draft {
    version: u32,
    zones: Vec<Zone>,
    zone_ids: Vec<Located>,
    components: Vec<Component>,
    component_ids: Vec<Located>,
    component_zones: Vec<Located>,
    flows: Vec<Flow>,
    flow_ends: Vec<Located>,
    zone_parents: Vec<Located>,
    exceptions: Vec<Exception>,
}

impl Model {
    /// Reads and parses the model file at `path`; errors name the path as given.
    ///
    /// # Errors
    /// Every problem in the file, or a single error when it cannot be read.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelErrors> {
        Model::load_with_text(path).map(|(model, _)| model)
    }

    /// Like [`Model::load`], and also returns the text that was parsed, so a caller can digest
    /// exactly what it put in force.
    ///
    /// # Errors
    /// Every problem in the file, or a single error when it cannot be read.
    pub fn load_with_text(path: impl AsRef<Path>) -> Result<(Model, String), ModelErrors> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let io_error = |message: String| {
            let mut reader = Reader::new(&name);
            reader.error_at(0, 0, ModelErrorKind::Io(message));
            Err(ModelErrors { errors: reader.errors })
        };
        // The parsed tree takes tens of times the file's size in memory, so a runaway file is
        // rejected before it is read.
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.len() > MAX_MODEL_BYTES => {
                return io_error(format!(
                    "the file has {} bytes, more than the {MAX_MODEL_BYTES} a model may have",
                    metadata.len()
                ));
            }
            _ => {}
        }
        match std::fs::read_to_string(path) {
            Ok(text) => Model::parse(&text, &name).map(|model| (model, text)),
            Err(e) => io_error(e.to_string()),
        }
    }

    /// Parses model YAML; `source_name` prefixes every error location.
    ///
    /// # Errors
    /// Every problem found, in file order within each pass.
    pub fn parse(text: &str, source_name: &str) -> Result<Model, ModelErrors> {
        let mut reader = Reader::new(source_name);

        let documents = match MarkedYaml::load_from_str(text) {
            Ok(documents) => documents,
            Err(e) => {
                let marker = e.marker();
                let kind = ModelErrorKind::Syntax(e.info().to_owned());
                reader.error_at(marker.line(), marker.col() + 1, kind);
                return Err(ModelErrors {
                    errors: reader.errors,
                });
            }
        };
        let Some(root) = documents.first() else {
            reader.error_at(
                1,
                1,
                ModelErrorKind::MissingField {
                    path: "the model".to_owned(),
                    field: "version",
                },
            );
            return Err(ModelErrors {
                errors: reader.errors,
            });
        };
        if let Some(extra) = documents.get(1) {
            let (line, column) = position(&extra.span);
            let reason = "a model file holds one YAML document".to_owned();
            let kind = ModelErrorKind::InvalidValue {
                path: "the file".to_owned(),
                value: "a second document".to_owned(),
                reason,
            };
            reader.error_at(line, column, kind);
        }

        let draft = read_top(&mut reader, root);
        let model = check_references(&mut reader, draft, source_name);
        if reader.errors.is_empty() {
            return Ok(model);
        }
        // Stable sort: errors at the same place keep the order the checks found them in.
        reader
            .errors
            .sort_by_key(|e| (e.location.line, e.location.column));
        Err(ModelErrors {
            errors: reader.errors,
        })
    }
}

fn read_top(reader: &mut Reader, root: &Node<'_>) -> Draft {
    let mut draft = Draft::default();
    let Some(top) = reader.mapping(root, "the model", TOP_KEYS) else {
        return draft;
    };

    match top.get("version") {
        None => reader.missing(&top, "version"),
        Some(node) => {
            if let Some(version) = reader.integer_in(node, "version", 0..=i64::from(u32::MAX)) {
                if version == i64::from(MODEL_VERSION) {
                    draft.version = MODEL_VERSION;
                } else {
                    let reason = format!("this build reads version {MODEL_VERSION}");
                    reader.invalid(&node.span, "version", version.to_string(), reason);
                }
            }
        }
    }

    for (i, item) in list(reader, &top, "zones") {
        read_zone(reader, item, &format!("zones[{i}]"), &mut draft);
    }
    for (i, item) in list(reader, &top, "components") {
        read_component(reader, item, &format!("components[{i}]"), &mut draft);
    }
    for (i, item) in list(reader, &top, "flows") {
        read_flow(reader, item, &format!("flows[{i}]"), &mut draft);
    }
    for (i, item) in list(reader, &top, "exceptions") {
        if let Some(exception) = read_exception(reader, item, &format!("exceptions[{i}]")) {
            draft.exceptions.push(exception);
        }
    }
    draft
}

/// Returns the items of an optional top-level list, numbered.
fn list<'n, 'input>(
    reader: &mut Reader,
    top: &Fields<'n, 'input>,
    key: &str,
) -> Vec<(usize, &'n Node<'input>)> {
    let Some(node) = top.get(key) else {
        return Vec::new();
    };
    reader
        .sequence(node, key)
        .map(|items| items.iter().enumerate().collect())
        .unwrap_or_default()
}

fn located(value: Option<(String, Span)>, path: String) -> Option<Located> {
    value.map(|(text, span)| Located { text, span, path })
}

fn read_zone(reader: &mut Reader, node: &Node<'_>, path: &str, draft: &mut Draft) -> Option<()> {
    let fields = reader.mapping(node, path, ZONE_KEYS)?;
    let id = located(
        reader.required_string(&fields, "id"),
        fields.field_path("id"),
    );
    let id_text = id.as_ref().map(|id| id.text.clone());
    draft.zone_ids.extend(id);
    let trust = match fields.get("trust") {
        None => {
            reader.missing(&fields, "trust");
            None
        }
        Some(node) => reader.integer_in(node, &fields.field_path("trust"), 0..=100),
    };
    let description = reader
        .optional_string(&fields, "description")
        .map(|(s, _)| s);
    let parent = located(
        reader.optional_string(&fields, "parent"),
        fields.field_path("parent"),
    );
    let parent_text = parent.as_ref().map(|p| p.text.clone());
    draft.zone_parents.extend(parent);

    let mut cidrs = Some(Vec::new());
    if let Some(match_node) = fields.get("match") {
        let match_path = fields.field_path("match");
        cidrs = reader
            .mapping(match_node, &match_path, ZONE_MATCH_KEYS)
            .and_then(|m| match m.get("cidrs") {
                None => Some(Vec::new()),
                Some(list) => read_cidrs(reader, list, &m.field_path("cidrs")),
            });
    }

    let (id, trust, cidrs) = (id_text?, trust?, cidrs?);
    let zone = Zone {
        id,
        trust: u8::try_from(trust).expect("trust is range-checked"),
        cidrs,
        parent: parent_text,
        description,
        line: position(&fields.span).0,
    };
    draft.zones.push(zone);
    Some(())
}

fn read_cidrs(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<Vec<IpNet>> {
    let entries = reader.string_list(node, path)?;
    let mut nets = Vec::with_capacity(entries.len());
    let mut ok = true;
    for (i, (text, span)) in entries.into_iter().enumerate() {
        match parse_cidr(&text) {
            Ok(net) => nets.push(net),
            Err(reason) => {
                let kind = ModelErrorKind::InvalidCidr {
                    path: format!("{path}[{i}]"),
                    value: text,
                    reason,
                };
                reader.error(&span, kind);
                ok = false;
            }
        }
    }
    ok.then_some(nets)
}

/// Parses a network, accepting a bare address as a single-host network. Host bits are cleared, so
/// `10.1.2.3/8` means `10.0.0.0/8`.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(address) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(address.to_canonical()));
    }
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .map_err(|_| "expected an address or ADDRESS/PREFIX".to_owned())
}

fn read_globs(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<GlobList> {
    let entries = reader.string_list(node, path)?;
    let mut ok = true;
    for (i, (pattern, span)) in entries.iter().enumerate() {
        if let Err(reason) = compile_glob(pattern) {
            let kind = ModelErrorKind::InvalidGlob {
                path: format!("{path}[{i}]"),
                pattern: pattern.clone(),
                reason,
            };
            reader.error(span, kind);
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    let patterns = entries.into_iter().map(|(p, _)| p).collect();
    // Each pattern compiled on its own above. A failure of the set as a whole is still recorded,
    // because a `None` without an error would build a model that silently lacks this list.
    match GlobList::new(patterns) {
        Ok(list) => Some(list),
        Err((pattern, reason)) => {
            reader.error(
                &node.span,
                ModelErrorKind::InvalidGlob {
                    path: path.to_owned(),
                    pattern,
                    reason,
                },
            );
            None
        }
    }
}

fn read_component(
    reader: &mut Reader,
    node: &Node<'_>,
    path: &str,
    draft: &mut Draft,
) -> Option<()> {
    let fields = reader.mapping(node, path, COMPONENT_KEYS)?;
    let id = located(
        reader.required_string(&fields, "id"),
        fields.field_path("id"),
    );
    let id_text = id.as_ref().map(|id| id.text.clone());
    draft.component_ids.extend(id);
    let zone = located(
        reader.required_string(&fields, "zone"),
        fields.field_path("zone"),
    );
    let zone_text = zone.as_ref().map(|zone| zone.text.clone());
    draft.component_zones.extend(zone);
    let exposed = reader.optional_bool(&fields, "exposed");
    let description = reader
        .optional_string(&fields, "description")
        .map(|(s, _)| s);

    let mut criticality = Some(Criticality::Medium);
    if let Some((name, span)) = reader.optional_string(&fields, "criticality") {
        criticality = Criticality::parse(&name);
        if criticality.is_none() {
            reader.invalid(
                &span,
                &fields.field_path("criticality"),
                format!("\"{name}\""),
                "expected low, medium, high or critical",
            );
        }
    } else if fields.get("criticality").is_some() {
        criticality = None;
    }

    let mut selectors = Some(None);
    if let Some(match_node) = fields.get("match") {
        selectors = read_selectors(reader, match_node, &fields.field_path("match")).map(Some);
    }

    let mut listens = Some(Vec::new());
    if let Some(list) = fields.get("listens") {
        let list_path = fields.field_path("listens");
        listens = reader.sequence(list, &list_path).and_then(|items| {
            let read: Vec<Option<Listen>> = items
                .iter()
                .enumerate()
                .map(|(i, item)| read_listen(reader, item, &format!("{list_path}[{i}]")))
                .collect();
            read.into_iter().collect()
        });
    }

    let mut executables = Some(GlobList::empty());
    if let Some(list) = fields.get("executables") {
        executables = read_globs(reader, list, &fields.field_path("executables"));
    }

    let mut data = Some(Vec::new());
    if let Some(list) = fields.get("data") {
        data = reader
            .string_list(list, &fields.field_path("data"))
            .map(|tags| tags.into_iter().map(|(tag, _)| tag).collect());
    }

    let component = Component {
        id: id_text?,
        zone: zone_text?,
        exposed: exposed.unwrap_or(false),
        criticality: criticality?,
        selectors: selectors?,
        listens: listens?,
        executables: executables?,
        data: data?,
        description,
        line: position(&fields.span).0,
        column: position(&fields.span).1,
    };
    draft.components.push(component);
    Some(())
}

fn read_selectors(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<Selectors> {
    let fields = reader.mapping(node, path, COMPONENT_MATCH_KEYS)?;
    let mut selectors = Selectors::default();
    let mut ok = true;

    if let Some(list) = fields.get("exe") {
        selectors.exe = read_globs(reader, list, &fields.field_path("exe"));
        ok &= selectors.exe.is_some();
    }
    if let Some(list) = fields.get("cgroup") {
        selectors.cgroup = read_globs(reader, list, &fields.field_path("cgroup"));
        ok &= selectors.cgroup.is_some();
    }
    if let Some(list) = fields.get("user") {
        selectors.user = read_users(reader, list, &fields.field_path("user"));
        ok &= selectors.user.is_some();
    }
    if let Some(list) = fields.get("unit") {
        selectors.unit = read_globs(reader, list, &fields.field_path("unit"));
        ok &= selectors.unit.is_some();
    }
    if let Some(map) = fields.get("container") {
        selectors.container = read_labels(reader, map, &fields.field_path("container"));
        ok &= selectors.container.is_some();
    }
    if let Some(map) = fields.get("pod") {
        selectors.pod = read_labels(reader, map, &fields.field_path("pod"));
        ok &= selectors.pod.is_some();
    }
    ok.then_some(selectors)
}

/// Reads a label map (`{ app: web, tier: front }`); values are strings.
fn read_labels(
    reader: &mut Reader,
    node: &Node<'_>,
    path: &str,
) -> Option<BTreeMap<String, String>> {
    let saphyr::YamlData::Mapping(entries) = &node.data else {
        reader.type_error(node, path, "a mapping of label names to values");
        return None;
    };
    let mut labels = BTreeMap::new();
    let mut ok = true;
    for (key, value) in entries {
        let Some(name) = reader.string(key, path) else {
            ok = false;
            continue;
        };
        match reader.string(value, &format!("{path}.{name}")) {
            Some(value) => {
                labels.insert(name, value);
            }
            None => ok = false,
        }
    }
    ok.then_some(labels)
}

fn read_users(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<Vec<UserSelector>> {
    let single = std::slice::from_ref(node);
    let items = match &node.data {
        saphyr::YamlData::Sequence(items) => items.as_slice(),
        _ => single,
    };
    let mut users = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match reader.string_or_integer(item, &item_path) {
            Some(Ok(name)) => users.push(UserSelector::Name(name)),
            Some(Err(uid)) => match u32::try_from(uid) {
                Ok(uid) => users.push(UserSelector::Uid(uid)),
                Err(_) => {
                    reader.invalid(
                        &item.span,
                        &item_path,
                        uid.to_string(),
                        "a uid is between 0 and 4294967295",
                    );
                    ok = false;
                }
            },
            None => ok = false,
        }
    }
    ok.then_some(users)
}

fn read_port(reader: &mut Reader, fields: &Fields<'_, '_>) -> Option<u16> {
    let Some(node) = fields.get("port") else {
        reader.missing(fields, "port");
        return None;
    };
    reader
        .integer_in(node, &fields.field_path("port"), 1..=65535)
        .map(|p| p as u16)
}

/// Reads `proto`, which defaults to tcp.
fn read_protocol(reader: &mut Reader, fields: &Fields<'_, '_>) -> Option<Protocol> {
    let Some((name, span)) = reader.optional_string(fields, "proto") else {
        return fields.get("proto").is_none().then_some(Protocol::Tcp);
    };
    match name.as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => {
            reader.invalid(
                &span,
                &fields.field_path("proto"),
                format!("\"{name}\""),
                "expected tcp or udp",
            );
            None
        }
    }
}

/// Reads `port` or `ports` (exactly one of them) into a sorted list without duplicates.
fn read_flow_ports(reader: &mut Reader, fields: &Fields<'_, '_>) -> Option<Vec<u16>> {
    let Some(list) = fields.get("ports") else {
        return read_port(reader, fields).map(|port| vec![port]);
    };
    let list_path = fields.field_path("ports");
    if let Some(single) = fields.get("port") {
        let reason = "a flow takes port or ports, not both";
        reader.invalid(
            &single.span,
            &fields.field_path("port"),
            "a second port list".to_owned(),
            reason,
        );
        return None;
    }
    let items = reader.sequence(list, &list_path)?;
    if items.is_empty() {
        let reason = "list at least one port";
        reader.invalid(&list.span, &list_path, "[]".to_owned(), reason);
        return None;
    }
    let mut ports = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match reader.integer_in(item, &format!("{list_path}[{i}]"), 1..=65535) {
            Some(port) => ports.push(port as u16),
            None => ok = false,
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ok.then_some(ports)
}

fn read_listen(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<Listen> {
    let fields = reader.mapping(node, path, LISTEN_KEYS)?;
    let port = read_port(reader, &fields);
    let protocol = read_protocol(reader, &fields);
    let mut address = Some(None);
    if let Some((text, span)) = reader.optional_string(&fields, "address") {
        address = match text.parse::<IpAddr>() {
            Ok(ip) => Some(Some(ip.to_canonical())),
            Err(_) => {
                reader.invalid(
                    &span,
                    &fields.field_path("address"),
                    format!("\"{text}\""),
                    "expected an IP address",
                );
                None
            }
        };
    } else if fields.get("address").is_some() {
        address = None;
    }
    Some(Listen {
        port: port?,
        protocol: protocol?,
        address: address?,
    })
}

fn read_flow(reader: &mut Reader, node: &Node<'_>, path: &str, draft: &mut Draft) -> Option<()> {
    let fields = reader.mapping(node, path, FLOW_KEYS)?;
    let from = located(
        reader.required_string(&fields, "from"),
        fields.field_path("from"),
    );
    let to = located(
        reader.required_string(&fields, "to"),
        fields.field_path("to"),
    );
    let from_text = from.as_ref().map(|from| from.text.clone());
    let to_text = to.as_ref().map(|to| to.text.clone());
    draft.flow_ends.extend(from);
    draft.flow_ends.extend(to);
    let ports = read_flow_ports(reader, &fields);
    let protocol = read_protocol(reader, &fields);
    let description = reader
        .optional_string(&fields, "description")
        .map(|(s, _)| s);
    let deny = reader.optional_bool(&fields, "deny");
    let mut direction = Some(Direction::Forward);
    if let Some((name, span)) = reader.optional_string(&fields, "direction") {
        direction = match name.as_str() {
            "forward" => Some(Direction::Forward),
            "both" => Some(Direction::Both),
            _ => {
                let reason = "expected forward (from connects to to) or both";
                reader.invalid(
                    &span,
                    &fields.field_path("direction"),
                    format!("\"{name}\""),
                    reason,
                );
                None
            }
        };
    } else if fields.get("direction").is_some() {
        direction = None;
    }
    if fields.get("deny").is_some() && deny.is_none() {
        return None;
    }

    let flow = Flow {
        from: from_text?,
        to: to_text?,
        ports: ports?,
        protocol: protocol?,
        direction: direction?,
        deny: deny.unwrap_or(false),
        description,
        line: position(&fields.span).0,
    };
    draft.flows.push(flow);
    Some(())
}

fn read_exception(reader: &mut Reader, node: &Node<'_>, path: &str) -> Option<Exception> {
    let fields = reader.mapping(node, path, EXCEPTION_KEYS)?;
    let id = reader.required_string(&fields, "id");
    let reason = reader.required_string(&fields, "reason");

    if let Some((text, span)) = &id {
        let category = text.split('@').next().unwrap_or_default();
        if !category.contains('*') && Category::parse(category).is_none() {
            let reason =
                "an exception id starts with a deviation category such as unexpected-flow, or *";
            reader.invalid(
                span,
                &fields.field_path("id"),
                format!("\"{text}\""),
                reason,
            );
        }
    }

    let mut expires: Option<Option<SystemTime>> = Some(None);
    if let Some((text, span)) = reader.optional_string(&fields, "expires") {
        expires = match parse_date(&text) {
            Ok(time) => Some(Some(time)),
            Err(reason) => {
                reader.invalid(
                    &span,
                    &fields.field_path("expires"),
                    format!("\"{text}\""),
                    reason,
                );
                None
            }
        };
    } else if fields.get("expires").is_some() {
        expires = None;
    }

    Some(Exception {
        id: IdPattern::new(id?.0),
        reason: reason?.0,
        expires: expires?,
        line: position(&fields.span).0,
        column: position(&fields.span).1,
    })
}

/// Runs the second pass: unique ids across zones and components, and references that resolve.
fn check_references(reader: &mut Reader, draft: Draft, source_name: &str) -> Model {
    let mut first_line: HashMap<&str, usize> = HashMap::new();
    for id in draft.zone_ids.iter().chain(&draft.component_ids) {
        if let Some(reason) = invalid_id_reason(&id.text) {
            let kind = ModelErrorKind::InvalidValue {
                path: id.path.clone(),
                value: format!("{:?}", id.text),
                reason: reason.to_owned(),
            };
            reader.error(&id.span, kind);
        }
        let line = position(&id.span).0;
        if let Some(&first_line) = first_line.get(id.text.as_str()) {
            let kind = ModelErrorKind::DuplicateId {
                path: id.path.clone(),
                id: id.text.clone(),
                first_line,
            };
            reader.error(&id.span, kind);
        } else {
            first_line.insert(&id.text, line);
        }
    }

    let zone_ids: Vec<String> = unique_texts(&draft.zone_ids);
    let zone_set: HashSet<&str> = zone_ids.iter().map(String::as_str).collect();
    for zone in &draft.component_zones {
        if !zone_set.contains(zone.text.as_str()) {
            let kind = ModelErrorKind::UnknownReference {
                path: zone.path.clone(),
                target: "zone",
                id: zone.text.clone(),
                known: zone_ids.clone(),
            };
            reader.error(&zone.span, kind);
        }
    }

    for parent in &draft.zone_parents {
        if !zone_set.contains(parent.text.as_str()) {
            let kind = ModelErrorKind::UnknownReference {
                path: parent.path.clone(),
                target: "zone",
                id: parent.text.clone(),
                known: zone_ids.clone(),
            };
            reader.error(&parent.span, kind);
        }
    }
    check_zone_cycles(reader, &draft);

    let components = unique_texts(&draft.component_ids);
    let component_set: HashSet<&str> = components.iter().map(String::as_str).collect();
    let mut known = components.clone();
    known.extend(zone_ids.iter().filter(|zone| !component_set.contains(zone.as_str())).cloned());
    let known_set: HashSet<&str> = known.iter().map(String::as_str).collect();
    for end in &draft.flow_ends {
        if !known_set.contains(end.text.as_str()) {
            let kind = ModelErrorKind::UnknownReference {
                path: end.path.clone(),
                target: "component or zone",
                id: end.text.clone(),
                known: known.clone(),
            };
            reader.error(&end.span, kind);
        }
    }

    build_model(
        source_name,
        draft.version,
        draft.zones,
        draft.components,
        draft.flows,
        draft.exceptions,
    )
}

/// Reports each zone whose `parent` chain leads back to itself, at its `parent` field.
fn check_zone_cycles(reader: &mut Reader, draft: &Draft) {
    let parent_of: HashMap<&str, &str> = draft
        .zones
        .iter()
        .filter_map(|z| z.parent.as_deref().map(|p| (z.id.as_str(), p)))
        .collect();
    for parent in &draft.zone_parents {
        // `zones[3].parent` belongs to the zone whose id was read at `zones[3].id`.
        let id_path = format!("{}id", parent.path.trim_end_matches("parent"));
        let Some(zone) = draft.zone_ids.iter().find(|z| z.path == id_path) else {
            continue;
        };
        let mut current = parent.text.as_str();
        for _ in 0..=parent_of.len() {
            if current == zone.text {
                let kind = ModelErrorKind::InvalidValue {
                    path: parent.path.clone(),
                    value: format!("\"{}\"", parent.text),
                    reason: format!("zone {} would be nested in itself", zone.text),
                };
                reader.error(&parent.span, kind);
                break;
            }
            match parent_of.get(current) {
                Some(next) => current = next,
                None => break,
            }
        }
    }
}

/// Returns the ids in file order, each once.
fn unique_texts(ids: &[Located]) -> Vec<String> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(ids.len());
    ids.iter().filter(|id| seen.insert(id.text.as_str())).map(|id| id.text.clone()).collect()
}

/// Returns why `id` cannot name a zone or component, if it cannot. Deviation ids join names with
/// `@` and exceptions match them with `*`, so neither may appear in a name.
fn invalid_id_reason(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("an id must not be empty")
    } else if id.contains(['@', '*']) {
        Some("an id must not contain '@' or '*', which deviation ids and exceptions use")
    } else if id.chars().any(|character| character.is_whitespace() || character.is_control()) {
        Some("an id must not contain whitespace or control characters")
    } else {
        None
    }
}

fn build_model(
    source: &str,
    version: u32,
    zones: Vec<Zone>,
    components: Vec<Component>,
    flows: Vec<Flow>,
    exceptions: Vec<Exception>,
) -> Model {
    let zone_index = zones
        .iter()
        .enumerate()
        .map(|(i, z)| (z.id.clone(), i))
        .collect();
    let component_index = components
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let mut cidr_table: Vec<(IpNet, usize)> = zones
        .iter()
        .enumerate()
        .flat_map(|(i, z)| z.cidrs.iter().map(move |net| (*net, i)))
        .collect();
    // Stable sort: among equal prefixes the zone declared first wins.
    cidr_table.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));

    Model {
        source: source.to_owned(),
        version,
        zones,
        components,
        flows,
        exceptions,
        zone_index,
        component_index,
        cidr_table,
    }
}
