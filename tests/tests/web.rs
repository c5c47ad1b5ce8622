//! The live view in a real headless browser: Debian's chromium driven over WebDriver
//! (chromedriver) against `driftwatch agent --web`, with real processes in network namespaces.
//!
//! Needs root, `DRIFTWATCH_BIN` (set by `cargo xtask test`, which also installs chromium and
//! chromium-driver) and /usr/bin/chromium and /usr/bin/chromedriver. Set
//! `DRIFTWATCH_KEEP_SCREENSHOT=1` to keep the screenshot the test takes; its path is printed.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use driftwatch_e2e::{
    demo_service_bin, driftwatch_bin, require_root, spawn_in, unique_suffix, wait_until, AgentUnderTest, Cgroup, ProcessGuard,
    Topology, WebDriver,
};
use serde_json::{json, Value};

/// How long the agent and the page may take to show a kernel event.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(30);
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

const WEB_V4: &str = "198.18.2.10";
const EXT_V4: &str = "198.19.0.10";

/// Declares web (dmz) and db (core) selected by cgroup, and the flows internet -> web -> db.
/// `{ROOT}` becomes the test's cgroup.
const MODEL: &str = r#"version: 1
zones:
  - { id: internet, trust: 0, match: { cidrs: ["0.0.0.0/0", "::/0"] } }
  - { id: dmz, trust: 40 }
  - { id: core, trust: 80 }
components:
  - id: web
    zone: dmz
    exposed: true
    match: { cgroup: ["{ROOT}/web"] }
    listens: [{ port: 8080 }]
    executables: ["**/driftwatch-demo-service"]
  - id: db
    zone: core
    criticality: high
    match: { cgroup: ["{ROOT}/db"] }
    listens: [{ port: 5432 }]
    executables: ["**/driftwatch-demo-service"]
flows:
  - { from: internet, to: web, port: 8080 }
  - { from: web, to: db, port: 5432 }
exceptions: []
"#;

/// A directory and a file name that together put markup into an executable path. The kernel
/// reports the path as it is, so the page must show it as text.
const HOSTILE_DIR: &str = "<script>window.dwInjected=1<";
const HOSTILE_FILE: &str = "script><img src=x onerror=window.dwInjected=2>";

/// chromedriver in a cgroup of its own, outside the agent's scope, so that every browser process
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
        let cgroup = Cgroup::create(&format!("dw-web-browser-{}", unique_suffix())).unwrap();
        let port = free_loopback_port();
        let mut command = Command::new(CHROMEDRIVER);
        command.arg(format!("--port={port}"));
        let driver = spawn_in(None, Some(&cgroup), command).unwrap();
        driver
            .wait_for_line(RUN_TIMEOUT, |line| line.contains("started successfully"))
            .unwrap();
        let profile = tempfile::Builder::new()
            .prefix("driftwatch-chromium-")
            .tempdir()
            .unwrap();
        Browser {
            driver,
            cgroup,
            port,
            profile: profile,
        }
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
        WebDriver::start(SocketAddr::from(([127, 0, 0, 1], self.port)), capabilities).unwrap_or_else(|error| {
            panic!(
                "failed to start chromium through chromedriver: {error}\n{}",
                self.driver.stderr()
            )
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.driver.kill();
        // A killed process keeps the cgroup busy until its parent reaps it, so the cgroup's own
        // drop could not remove the directory yet.
        let killed = self.cgroup.kill_remaining().unwrap_or_default();
        let _ = wait_until(Duration::from_secs(10), || {
            killed.iter().all(|pid| !Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        });
    }
}

/// Returns a loopback port that was free a moment ago. chromedriver takes its port on the command
/// line and cannot report one it chose, so a port bound by another process in between fails the
/// test with chromedriver's own error.
fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Reads the live view's address from the agent's log line `live view listening url=http://...`,
/// which the agent writes before its ready file. The log may carry colour codes between the field
/// name and its value, so the address is read from the `http://` on.
fn web_addr(agent: &AgentUnderTest) -> SocketAddr {
    let log = agent.log();
    let line = log
        .lines()
        .find(|line| line.contains("live view listening"))
        .unwrap_or_else(|| panic!("the agent did not log the live view's address:\n{log}"));
    let start = line.find("http://").unwrap_or_else(|| panic!("no URL in the log line {line:?}")) + "http://".len();
    let rest = &line[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|_| panic!("bad live view address in the log line {line:?}"))
}

/// Runs `script` in the page until it returns something other than null or false.
fn wait_for_page(client: &WebDriver, agent: &AgentUnderTest, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + OBSERVE_TIMEOUT;
    loop {
        let value = client.execute(script).unwrap();
        if !value.is_null() && value != Value::Bool(false) {
            return value;
        }
        if Instant::now() >= deadline {
            let list = client
                .execute("return document.getElementById('deviations').innerText")
                .unwrap_or(Value::Null);
            panic!(
                "{what} did not appear in the page within {OBSERVE_TIMEOUT:?}\npage list:\n{}\nagent log:\n{}",
                list.as_str().unwrap_or(""),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Returns the state of the drawn edge from `source` to `destination` on `port`, or null.
fn edge_script(source: &str, destination: &str, port: u16) -> String {
    format!(
        "const edge = document.querySelector('path.edge[data-source=\"{source}\"][data-destination=\"{destination}\"][data-port=\"{port}\"]'); \
         return edge ? edge.getAttribute('class') : null;"
    )
}

/// Returns `[sequence, category, executable]` of each deviation in the list, newest first.
const LIST_SCRIPT: &str = "return Array.from(document.querySelectorAll('#deviations > li')).map(item => { \
     const rows = Array.from(item.querySelectorAll('dt')); \
     const exe = rows.find(row => row.textContent === 'executable'); \
     return [Number(item.dataset.sequence), item.querySelector('.category').textContent, \
             exe ? exe.nextElementSibling.textContent : null]; });";

#[test]
fn live_view_shows_declared_flows_and_live_deviations() {
    require_root().unwrap();
    let bin = driftwatch_bin().unwrap();
    let service = demo_service_bin().unwrap();
    let workdir = tempfile::Builder::new()
        .prefix("driftwatch-web-test-")
        .tempdir()
        .unwrap();

    let mut topology = Topology::new().unwrap();
    topology
        .add_host("web", &format!("{WEB_V4}/24"), "fd00:d5:2::10/64")
        .unwrap();
    topology
        .add_host("ext", &format!("{EXT_V4}/24"), "fd00:d5:9::10/64")
        .unwrap();
    let root = Cgroup::create(&format!("dw-web-{}", unique_suffix())).unwrap();
    let web = root.child("web").unwrap();
    let _db = root.child("db").unwrap();

    let model = workdir.path().join("model.yaml");
    fs::write(&model, MODEL.replace("{ROOT}", root.relative_path())).unwrap();
    let agent = AgentUnderTest::start_with(&bin, &model, root.path(), &["--web", "127.0.0.1:0"]).unwrap();
    let page_url = format!("http://{}/", web_addr(&agent));

    let mut ext_service = Command::new(&service);
    ext_service.args(["db", "--listen", "[::]:9999"]);
    let ext = spawn_in(Some(&topology.host("ext").netns), None, ext_service).unwrap();
    ext.wait_for_line(RUN_TIMEOUT, |line| line.starts_with("listening"))
        .unwrap();

    // The demo service under a path that carries markup.
    let hostile_dir = workdir.path().join(HOSTILE_DIR);
    fs::create_dir(&hostile_dir).unwrap();
    let hostile_exe = hostile_dir.join(HOSTILE_FILE);
    fs::copy(&service, &hostile_exe).unwrap();
    fs::set_permissions(&hostile_exe, fs::Permissions::from_mode(0o755)).unwrap();
    let hostile_exe_text = hostile_exe.to_str().unwrap().to_string();

    let browser = Browser::start();
    {
        let client = browser.session();
        client.goto(&page_url).unwrap();

        // The declared flows are drawn before any traffic, as flows not seen yet.
        let internet_web = wait_for_page(
            &client,
            &agent,
            "the edge internet -> web:8080",
            &edge_script("internet", "web", 8080),
        );
        assert_eq!(internet_web, "edge declared-unseen");
        let web_db = wait_for_page(
            &client,
            &agent,
            "the edge web -> db:5432",
            &edge_script("web", "db", 5432),
        );
        assert_eq!(web_db, "edge declared-unseen");
        let zones = client
            .execute("return Array.from(document.querySelectorAll('g.zone-box')).map(zone => zone.dataset.zone)")
            .unwrap();
        assert_eq!(zones, json!(["internet", "dmz", "core"]));
        let connection = wait_for_page(
            &client,
            &agent,
            "the live connection state",
            "const state = document.getElementById('connection').textContent; return state === 'live' ? state : null;",
        );
        assert_eq!(connection, "live");
        let list = client.execute(LIST_SCRIPT).unwrap();
        assert_eq!(list, json!([]));

        // A marker that a reload would wipe.
        client.execute("window.dwNotReloaded = 42; return null;").unwrap();

        let mut client_command = Command::new(&hostile_exe);
        client_command.args(["client", "--target", &format!("{EXT_V4}:9999"), "--requests", "1"]);
        let mut connect = spawn_in(Some(&topology.host("web").netns), Some(&web), client_command).unwrap();
        connect.wait_success(RUN_TIMEOUT).unwrap();
        let pid = connect.pid();

        let flow = wait_for_page(
            &client,
            &agent,
            "the unexpected-flow deviation",
            &format!(
                "{LIST_SCRIPT_BODY} return list.find(row => row[1] === 'unexpected-flow') || null;",
                LIST_SCRIPT_BODY = LIST_SCRIPT.replacen("return ", "const list = ", 1)
            ),
        );
        assert_eq!(flow[2], Value::String(hostile_exe_text.clone()));
        let process = client
            .execute(
                "const item = Array.from(document.querySelectorAll('#deviations > li')).find(li => li.querySelector('.category').textContent === 'unexpected-flow'); \
                 const rows = Array.from(item.querySelectorAll('dt')); \
                 return rows.find(row => row.textContent === 'process').nextElementSibling.textContent;",
            )
            .unwrap();
        assert_eq!(
            process.as_str().unwrap().split(',').next(),
            Some(format!("pid {pid}").as_str())
        );
        let severity = client
            .execute(
                "const item = Array.from(document.querySelectorAll('#deviations > li')).find(li => li.querySelector('.category').textContent === 'unexpected-flow'); \
                 return item.querySelector('.severity').textContent;",
            )
            .unwrap();
        assert!(
            ["low", "medium", "elevated", "high", "critical"].contains(&severity.as_str().unwrap()),
            "severity {severity}"
        );

        // The markup in the path stayed text: nothing ran and no element came from it.
        let injected = client.execute("return window.dwInjected === undefined;").unwrap();
        assert_eq!(injected, true, "markup in an executable path ran in the page");
        let images = client
            .execute("return document.querySelectorAll('img').length;")
            .unwrap();
        assert_eq!(images, 0);
        let scripts = client.execute("return document.scripts.length;").unwrap();
        assert_eq!(scripts, 1);
        let not_reloaded = client.execute("return window.dwNotReloaded;").unwrap();
        assert_eq!(not_reloaded, 42, "the page reloaded");

        // The graph refreshes with the undeclared edge, drawn as a deviation.
        let deviation_edge = wait_for_page(
            &client,
            &agent,
            "the edge web -> internet:9999",
            &edge_script("web", "internet", 9999),
        );
        assert_eq!(deviation_edge, "edge deviation");

        // After a reconnect the page resumes after its last sequence: the next deviation arrives
        // once and nothing already shown comes again.
        let before = client.execute("return window.driftwatchLive.lastSequence();").unwrap();
        client
            .execute("window.driftwatchLive.reconnectNow(); return null;")
            .unwrap();
        let mut id = spawn_in(
            Some(&topology.host("web").netns),
            Some(&web),
            Command::new("/usr/bin/id"),
        )
        .unwrap();
        id.wait_success(RUN_TIMEOUT).unwrap();
        wait_for_page(
            &client,
            &agent,
            "the unexpected-executable deviation for /usr/bin/id",
            &format!(
                "{} return list.find(row => row[2] === '/usr/bin/id') || null;",
                LIST_SCRIPT.replacen("return ", "const list = ", 1)
            ),
        );
        let list = client.execute(LIST_SCRIPT).unwrap();
        let sequences: Vec<u64> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row[0].as_u64().unwrap())
            .collect();
        assert!(
            sequences.windows(2).all(|pair| pair[0] > pair[1]),
            "the list is not in strictly decreasing sequence order, so a deviation came twice: {sequences:?}"
        );
        assert!(
            sequences[0] > before.as_u64().unwrap(),
            "sequences {sequences:?}, before the reconnect {before}"
        );

        let screenshot = client.screenshot().unwrap();
        assert_eq!(&screenshot[..8], b"\x89PNG\r\n\x1a\n");
        let path = workdir.path().join("live-view.png");
        fs::write(&path, &screenshot).unwrap();
        eprintln!("screenshot: {}", path.display());

        client.close().unwrap();
    }

    drop(browser);
    drop(ext);
    drop(agent);
    if std::env::var_os("DRIFTWATCH_KEEP_SCREENSHOT").is_some() {
        let kept: PathBuf = workdir.keep();
        eprintln!("kept {}", kept.display());
    }
    let _ = root.kill_remaining();
}

#[test]
fn web_address_must_be_loopback() {
    let Ok(bin) = driftwatch_bin() else {
        panic!("DRIFTWATCH_BIN is not set: run this test with `cargo xtask test`");
    };
    let output = Command::new(&bin)
        .args(["agent", "--model", "/nonexistent.yaml", "--web", "0.0.0.0:9180"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("live view address 0.0.0.0:9180 is not a loopback address"),
        "stderr: {stderr}"
    );
}
