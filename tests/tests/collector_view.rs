//! The collector's live view and metrics, end to end: two agents, each scoped to its own cgroup with
//! its workload in its own network namespace acting as a host, push to one collector that runs with
//! `--web`, `--model` and `--metrics`. A real headless chromium (over chromedriver) reads the
//! collector's page, and a plain HTTP client reads its `/metrics`.
//!
//! Needs root, `DRIFTWATCH_BIN` and `DRIFTWATCH_DEMO_BIN` (set by `cargo xtask test`, which also
//! installs chromium and chromium-driver) and /usr/bin/chromium and /usr/bin/chromedriver.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, stream, unique_suffix, wait_until, AgentUnderTest, Cgroup,
    CollectorUnderTest, ProcessGuard, Topology, WebDriver,
};
use driftwatch_proto::v1::AgentStatus;
use serde_json::{json, Value};

/// How long an event may take to travel from the kernel through an agent and the collector to
/// the page.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

const WEB_V4: &str = "198.18.2.10";
const DB_V4: &str = "198.18.4.10";
/// A host without an agent, outside every zone of the model.
const EXT_V4: &str = "198.19.0.10";

/// web (dmz) and db (core), each selected by its cgroup; web may reach db on 5432. `{ROOT}`
/// becomes the test's cgroup. The agents and the collector load the same file.
const MODEL: &str = r#"version: 1
zones:
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: web
    zone: dmz
    match: { cgroup: ["{ROOT}/web"] }
    executables: ["**/driftwatch-demo-service"]
  - id: db
    zone: core
    match: { cgroup: ["{ROOT}/db"] }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
flows:
  - { from: web, to: db, port: 5432 }
exceptions: []
"#;

/// The agents' hosts, their addresses and node names.
const HOSTS: [(&str, &str, &str); 2] = [("web", WEB_V4, "web-1"), ("db", DB_V4, "db-1")];

/// chromedriver in a cgroup of its own, outside the agents' scopes, so that every browser process
/// it starts can be killed by pid when the test ends.
struct Browser {
    driver: ProcessGuard,
    cgroup: Cgroup,
    port: u16,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        for program in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(program).is_file(),
                "{program} is missing: install chromium and chromium-driver (cargo xtask test does)"
            );
        }
        let cgroup = Cgroup::create(&format!("dw-hI-colview-browser-{}", unique_suffix())).unwrap();
        // chromedriver takes its port on the command line and cannot report one it chose, so a
        // port bound by another process in between fails the test with chromedriver's own error.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut command = Command::new(CHROMEDRIVER);
        command.arg(format!("--port={port}"));
        let driver = spawn_in(None, Some(&cgroup), command).unwrap();
        driver.wait_for_line(RUN_TIMEOUT, |line| line.contains("started successfully")).unwrap();
        let profile = tempfile::Builder::new().prefix("driftwatch-hI-chromium-").tempdir().unwrap();
        Browser { driver, cgroup, port, profile }
    }

    fn session(&self) -> WebDriver {
        let capabilities = json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--window-size=1600,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ]
            }
        });
        WebDriver::start(SocketAddr::from(([127, 0, 0, 1], self.port)), capabilities)
            .unwrap_or_else(|error| panic!("failed to start chromium through chromedriver: {error}\n{}", self.driver.stderr()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.kill();
        // A killed process keeps the cgroup busy until its parent reaps it.
        let killed = self.cgroup.kill_remaining().unwrap_or_default();
        let _ = wait_until(Duration::from_secs(10), || {
            killed.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        });
    }
}

/// Returns the field `field` of the first JSON log record whose message is `message`, waiting for
/// it: the HTTP servers log their addresses from their own tasks, which may run after the ready
/// file is written.
fn logged_field(log: impl Fn() -> String, message: &str, field: &str) -> String {
    let found = wait_until(OBSERVE_TIMEOUT, || {
        log().lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|record| record["fields"]["message"] == message)
            .and_then(|record| record["fields"][field].as_str().map(String::from))
    });
    found.unwrap_or_else(|| panic!("no log record {message:?} with {field}:\n{}", log()))
}

/// Fetches `/metrics` with a plain HTTP/1.1 request and returns the samples by `name{labels}`.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, name: &str) -> Option<u64> {
    samples.get(name).map(|value| *value as u64)
}

fn counter(status: &AgentStatus, name: &str) -> u64 {
    status.counters.iter().find(|counter| counter.name == name).map_or(0, |counter| counter.value)
}

/// Runs `script` in the page until it returns something other than null or false.
fn wait_for_page(client: &WebDriver, collector: &CollectorUnderTest, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + OBSERVE_TIMEOUT;
    loop {
        let value = client.execute(script).unwrap();
        if !value.is_null() && value != Value::Bool(false) {
            return value;
        }
        if Instant::now() >= deadline {
            let list = client.execute("return document.getElementById('deviations').innerText").unwrap_or(Value::Null);
            let graph = client.execute("return document.getElementById('graph').innerHTML").unwrap_or(Value::Null);
            panic!(
                "{what} did not appear in the page within {OBSERVE_TIMEOUT:?}\npage list:\n{}\ngraph:\n{}\ncollector log:\n{}",
                list.as_str().unwrap_or(""),
                graph.as_str().unwrap_or(""),
                collector.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Returns the class of the drawn edge from `source` to `destination` on `port`, or null.
fn edge_script(source: &str, destination: &str, port: u16) -> String {
    format!(
        "const edge = document.querySelector('path.edge[data-source=\"{source}\"][data-destination=\"{destination}\"][data-port=\"{port}\"]'); \
         return edge ? edge.getAttribute('class') : null;"
    )
}

/// Returns the node names a graph node is drawn with, or null while it has none.
fn hosts_script(node: &str) -> String {
    format!("const node = document.querySelector('g.node[data-id=\"{node}\"]'); return node ? node.getAttribute('data-hosts') : null;")
}

/// Sets `list` to `[node, category, flow, executable, sequence]` of each deviation in the page,
/// newest first.
const LIST_SCRIPT: &str = "const list = Array.from(document.querySelectorAll('#deviations > li')).map(item => { \
     const rows = Array.from(item.querySelectorAll('dt')); \
     const flow = rows.find(row => row.textContent === 'flow'); \
     const exe = rows.find(row => row.textContent === 'executable'); \
     const node = item.querySelector('.deviation-head .node'); \
     return [node ? node.textContent : null, item.querySelector('.category').textContent, \
             flow ? flow.nextElementSibling.textContent : null, exe ? exe.nextElementSibling.textContent : null, \
             Number(item.dataset.sequence)]; });";

#[test]
fn collector_view_shows_live_fleet() {
    require_root().unwrap();
    let bin = driftwatch_bin().unwrap();
    let service = demo_service_bin().unwrap();
    let workdir = tempfile::Builder::new().prefix("driftwatch-hI-colview-").tempdir().unwrap();

    let mut topology = Topology::tagged("hI").unwrap();
    for (index, (host, v4, _)) in HOSTS.iter().enumerate() {
        topology.add_host(host, &format!("{v4}/24"), &format!("fd00:e9:{}::10/64", index + 1)).unwrap();
    }
    topology.add_host("ext", &format!("{EXT_V4}/24"), "fd00:e9:9::10/64").unwrap();
    let root = Cgroup::create(&format!("dw-hI-colview-{}", unique_suffix())).unwrap();
    let cgroups: BTreeMap<&str, Cgroup> = HOSTS.iter().map(|(host, _, _)| (*host, root.child(host).unwrap())).collect();
    let model = workdir.path().join("model.yaml");
    fs::write(&model, MODEL.replace("{ROOT}", root.relative_path())).unwrap();

    let model_arg = model.to_str().unwrap();
    let collector = CollectorUnderTest::start_with(&[
        "--model",
        model_arg,
        "--web",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ])
    .unwrap();
    let page_url = logged_field(|| collector.log(), "live view listening", "url");
    let collector_metrics: SocketAddr = logged_field(|| collector.log(), "metrics listening", "addr").parse().unwrap();
    let collector_addr = collector.addr().to_string();

    let mut agents: BTreeMap<&str, AgentUnderTest> = BTreeMap::new();
    for (host, v4, node) in HOSTS {
        let args = [
            "--collector",
            collector_addr.as_str(),
            "--node",
            node,
            "--advertise-address",
            v4,
            "--snapshot-interval",
            "0.2",
            "--metrics",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ];
        agents.insert(host, AgentUnderTest::start_with(&bin, &model, cgroups[host].path(), &args).unwrap());
    }
    let connected = wait_until(OBSERVE_TIMEOUT, || {
        let status = stream::status(collector.addr()).ok()?;
        (status.nodes.iter().filter(|node| node.connected).count() == HOSTS.len()).then_some(())
    });
    assert!(connected.is_some(), "not every agent connected to the collector:\n{}", collector.log());

    // The declared flow web -> db crosses hosts, so only the collector has both of its ends.
    let mut db_service = Command::new(&service);
    db_service.args(["db", "--listen", "0.0.0.0:5432"]);
    let db = spawn_in(Some(&topology.host("db").netns), Some(&cgroups["db"]), db_service).unwrap();
    db.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();
    let mut declared_client = Command::new(&service);
    declared_client.args(["client", "--target", &format!("{DB_V4}:5432"), "--requests", "2"]);
    spawn_in(Some(&topology.host("web").netns), Some(&cgroups["web"]), declared_client)
        .unwrap()
        .wait_success(RUN_TIMEOUT)
        .unwrap();
    let mut ext_service = Command::new(&service);
    ext_service.args(["db", "--listen", "0.0.0.0:9999"]);
    let ext = spawn_in(Some(&topology.host("ext").netns), None, ext_service).unwrap();
    ext.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening")).unwrap();

    let browser = Browser::start();
    let client = browser.session();
    client.goto(&page_url).unwrap();

    let web_db = wait_for_page(&client, &collector, "the merged edge web -> db:5432", &edge_script("web", "db", 5432));
    assert_eq!(web_db, "edge declared-seen");
    assert_eq!(wait_for_page(&client, &collector, "the node of web", &hosts_script("web")), "web-1");
    assert_eq!(wait_for_page(&client, &collector, "the node of db", &hosts_script("db")), "db-1");
    let connection = wait_for_page(
        &client,
        &collector,
        "the live connection state",
        "const state = document.getElementById('connection').textContent; return state === 'live' ? state : null;",
    );
    assert_eq!(connection, "live");

    // A marker that a reload would wipe.
    client.execute("window.dwNotReloaded = 42; return null;").unwrap();
    let mut undeclared_client = Command::new(&service);
    undeclared_client.args(["client", "--target", &format!("{EXT_V4}:9999"), "--requests", "1"]);
    spawn_in(Some(&topology.host("web").netns), Some(&cgroups["web"]), undeclared_client)
        .unwrap()
        .wait_success(RUN_TIMEOUT)
        .unwrap();

    let row = wait_for_page(
        &client,
        &collector,
        "the deviation of the connect to port 9999",
        &format!("{LIST_SCRIPT} return list.find(row => row[1] === 'unexpected-flow' && (row[2] || '').endsWith('tcp/9999')) || null;"),
    );
    assert_eq!(row[0], "web-1", "{row}");
    assert_eq!(client.execute("return window.dwNotReloaded;").unwrap(), 42, "the page reloaded");

    // After a reconnect the page resumes after the last sequence it received: a deviation from
    // the other agent arrives once, with its node, and nothing already shown comes again.
    let before = client.execute("return window.driftwatchLive.lastSequence();").unwrap().as_u64().unwrap();
    client.execute("window.driftwatchLive.reconnectNow(); return null;").unwrap();
    spawn_in(Some(&topology.host("db").netns), Some(&cgroups["db"]), Command::new("/usr/bin/id"))
        .unwrap()
        .wait_success(RUN_TIMEOUT)
        .unwrap();
    let id_row = wait_for_page(
        &client,
        &collector,
        "the unexpected-executable deviation for /usr/bin/id on db",
        &format!("{LIST_SCRIPT} return list.find(row => row[1] === 'unexpected-executable' && row[3] === '/usr/bin/id') || null;"),
    );
    assert_eq!(id_row[0], "db-1", "{id_row}");
    assert!(id_row[4].as_u64().unwrap() > before, "{id_row}, last sequence before the reconnect {before}");
    let list = client.execute(&format!("{LIST_SCRIPT} return list;")).unwrap();
    let sequences: Vec<u64> = list.as_array().unwrap().iter().map(|row| row[4].as_u64().unwrap()).collect();
    assert!(
        sequences.windows(2).all(|pair| pair[0] > pair[1]),
        "the list is not in strictly decreasing sequence order, so a deviation came twice: {sequences:?}"
    );
    for row in list.as_array().unwrap() {
        assert!(row[0] == "web-1" || row[0] == "db-1", "a deviation without its fleet node: {row}");
    }
    assert_eq!(client.execute("return window.dwNotReloaded;").unwrap(), 42, "the page reloaded");
    client.close().unwrap();
    drop(browser);

    // Every deviation each agent raised, acknowledged, stored once and timed once.
    let mut statuses: BTreeMap<&str, AgentStatus> = BTreeMap::new();
    for (host, _, _) in HOSTS {
        let api = agents[host].api_addr();
        let settled = wait_until(OBSERVE_TIMEOUT, || {
            let status = stream::status(api).ok()?;
            (counter(&status, "collector_acknowledged_sequence") == status.last_sequence).then_some(status)
        });
        statuses.insert(host, settled.unwrap_or_else(|| panic!("agent {host} never had everything acknowledged\n{}", agents[host].log())));
    }
    assert!(statuses["web"].last_sequence > 0, "the web agent raised nothing");

    let samples = scrape(collector_metrics);
    assert_eq!(sample(&samples, "driftwatch_collector_nodes_connected"), Some(2));
    for (host, _, node) in HOSTS {
        let raised = statuses[host].last_sequence;
        let labels = format!("{{node=\"{node}\"}}");
        assert_eq!(sample(&samples, &format!("driftwatch_collector_deviations_received_total{labels}")), Some(raised), "{node}");
        assert_eq!(sample(&samples, &format!("driftwatch_collector_deviations_lost_total{labels}")), Some(0), "{node}");
        let lag_count = sample(&samples, &format!("driftwatch_collector_lag_seconds_count{labels}"));
        // A node that raised nothing has no lag series yet.
        assert_eq!(lag_count.unwrap_or(0), raised, "{node}");
        let lag_sum = samples.get(&format!("driftwatch_collector_lag_seconds_sum{labels}")).copied().unwrap_or(0.0);
        eprintln!("{node}: {raised} deviations received, lag {lag_sum:.3} s in total");
    }
    let web_lag = sample(&samples, "driftwatch_collector_lag_seconds_bucket{le=\"+Inf\",node=\"web-1\"}")
        .or_else(|| sample(&samples, "driftwatch_collector_lag_seconds_bucket{node=\"web-1\",le=\"+Inf\"}"));
    assert_eq!(web_lag, Some(statuses["web"].last_sequence), "{samples:#?}");
    assert_eq!(sample(&samples, "driftwatch_graph_edges").map(|edges| edges > 0), Some(true));
    let journal_bytes = fs::metadata(collector.data_dir().join("journal.jsonl")).map(|metadata| metadata.len()).ok();
    assert_eq!(sample(&samples, "driftwatch_collector_journal_bytes"), journal_bytes, "{:?}", fs::read_dir(collector.data_dir()).map(|dir| dir.count()));

    // The backlog each agent reports with its snapshots drains to 0 once everything is acknowledged.
    let drained = wait_until(OBSERVE_TIMEOUT, || {
        let samples = scrape(collector_metrics);
        HOSTS
            .iter()
            .all(|(_, _, node)| sample(&samples, &format!("driftwatch_collector_node_unacknowledged{{node=\"{node}\"}}")) == Some(0))
            .then_some(())
    });
    assert!(drained.is_some(), "the collector never saw an empty backlog: {:#?}", scrape(collector_metrics));

    let web_agent = &agents["web"];
    let agent_metrics: SocketAddr = logged_field(|| web_agent.log(), "metrics listening", "addr").parse().unwrap();
    let agent_samples = scrape(agent_metrics);
    assert_eq!(sample(&agent_samples, "driftwatch_push_backlog"), Some(0));
    assert_eq!(sample(&agent_samples, "driftwatch_push_acknowledged_sequence"), Some(statuses["web"].last_sequence));
    assert_eq!(sample(&agent_samples, "driftwatch_push_connected"), Some(1));

    drop(ext);
    drop(db);
    drop(agents);
    let _ = root.kill_remaining();
}
