//! Demo output: the deviation summary, the graph as text, and the commands for a second
//! shell when the demo keeps running.

use std::collections::BTreeMap;
use std::path::Path;

use driftwatch_e2e::stream::{category_name, severity_name};
use driftwatch_proto::v1::{Deviation, Graph, Protocol};

use super::stack::{DemoStack, ADDRESSES};

/// Prints one row per deviation id, most severe first, with the latest count the stream carried.
pub fn print_summary(deviations: &[Deviation]) {
    // The agent re-sends an id with a higher count while it keeps happening; keep the latest.
    let mut latest: BTreeMap<&str, &Deviation> = BTreeMap::new();
    for deviation in deviations {
        latest
            .entry(deviation.id.as_str())
            .and_modify(|kept| {
                if deviation.count >= kept.count {
                    *kept = deviation;
                }
            })
            .or_insert(deviation);
    }
    let mut rows: Vec<&Deviation> = latest.into_values().collect();
    rows.sort_by(|a, b| b.severity.cmp(&a.severity).then_with(|| a.id.cmp(&b.id)));

    let id_width = rows
        .iter()
        .map(|row| row.id.len())
        .max()
        .unwrap_or(2)
        .max(2);
    println!(
        "{:<24} {:<9} {:<id_width$} {:>5}",
        "CATEGORY", "SEVERITY", "ID", "COUNT"
    );
    for row in rows {
        println!(
            "{:<24} {:<9} {:<id_width$} {:>5}",
            category_name(row.category),
            severity_name(row.severity),
            row.id,
            row.count
        );
    }
}

/// Prints the observed graph as text.
pub fn print_graph(graph: &Graph) {
    println!("observed graph:\n{}", graph_text(graph));
}

/// Formats the graph as indented lines, one per edge, marked when no declared flow allows it.
pub fn graph_text(graph: &Graph) -> String {
    if graph.edges.is_empty() {
        return "  (no edges yet)".to_string();
    }
    let mut edges: Vec<_> = graph.edges.iter().collect();
    edges.sort_by(|a, b| {
        (&a.source, &a.destination, a.port).cmp(&(&b.source, &b.destination, b.port))
    });
    edges
        .iter()
        .map(|edge| {
            let protocol = match Protocol::try_from(edge.protocol) {
                Ok(Protocol::Udp) => "udp",
                _ => "tcp",
            };
            let verdict = if edge.declared {
                "declared"
            } else {
                "UNDECLARED"
            };
            format!(
                "  {:>12} -> {:<14} {protocol}/{:<5} {:>4} connections  {verdict}",
                edge.source, edge.destination, edge.port, edge.connections
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints the commands a second shell can use while the demo keeps running.
pub fn print_keep_running(stack: &DemoStack, agent_bin: &Path, service_bin: &Path) {
    let api = stack.agent.api_arg();
    let agent = agent_bin.display();
    let client_netns = stack.topology.host("client").netns.name();
    println!("\nthe demo keeps running; in a second shell, as root:");
    println!("  {agent} watch --api {api} --replay");
    println!("  {agent} graph --api {api} --format dot");
    println!("  {agent} status --api {api}");
    println!(
        "  ip netns exec {client_netns} {} client --target {}:8080 --requests 5",
        service_bin.display(),
        ADDRESSES.web
    );
    println!("running services:");
    for (name, pid) in stack.services() {
        println!("  {name:<7} pid {pid}");
    }
    println!("press Ctrl-C here to stop everything and clean up");
}
