use tonic::Code;

use super::*;

fn collector() -> Collector {
    Collector::open(CollectorConfig { data_dir: None, hub: HubConfig::default(), model: None }).unwrap()
}

fn counter(collector: &Collector, name: &str) -> u64 {
    let status = collector.status();
    status.counters.iter().find(|(counter, _)| counter == name).map_or(0, |(_, value)| *value)
}

#[test]
fn second_run_of_an_open_node_is_rejected() {
    let collector = collector();
    let (first, _) = collector.open_stream("web-1", 11, "test").unwrap();

    let status = collector.open_stream("web-1", 22, "test").unwrap_err();

    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(
        status.message(),
        "node web-1 already has an open push stream from agent run 11, so this stream from run 22 is rejected; \
         two agents share the node name: give each agent a unique --node"
    );
    assert_eq!(counter(&collector, "collector_streams_rejected"), 1);
    // The first stream keeps its node and its run's cursor.
    assert_eq!(collector.accept_gap(&first, 1, 3).unwrap(), 3);
    let (_, resume) = collector.open_stream("web-1", 11, "test").unwrap();
    assert_eq!(resume, 3);
}

#[test]
fn reconnect_of_the_same_run_replaces_the_stream() {
    let collector = collector();
    let (first, _) = collector.open_stream("web-1", 11, "test").unwrap();
    collector.accept_gap(&first, 1, 2).unwrap();

    let (second, resume) = collector.open_stream("web-1", 11, "test").unwrap();

    assert_eq!(resume, 2);
    assert_eq!(collector.accept_gap(&first, 3, 3).unwrap_err().code(), Code::Aborted);
    assert_eq!(collector.accept_gap(&second, 3, 3).unwrap(), 3);
    assert_eq!(counter(&collector, "collector_streams_rejected"), 0);
}

#[test]
fn new_run_takes_over_once_the_stream_closes() {
    let collector = collector();
    let (first, _) = collector.open_stream("web-1", 11, "test").unwrap();
    collector.accept_gap(&first, 1, 5).unwrap();
    assert!(collector.open_stream("web-1", 22, "test").is_err());

    collector.close_stream(&first);
    let (second, resume) = collector.open_stream("web-1", 22, "test").unwrap();

    assert_eq!(resume, 0, "a new run starts its sequence again");
    assert_eq!(collector.accept_gap(&second, 1, 1).unwrap(), 1);
    assert_eq!(counter(&collector, "collector_streams_rejected"), 1);
    let nodes = collector.nodes();
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].connected);
}
