//! The demo service's line protocol on loopback: the three tiers relay, the web tier runs EXEC,
//! and bad arguments are rejected. No root needed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

const SERVICE: &str = env!("CARGO_BIN_EXE_driftwatch-demo-service");

/// A listening service; drop kills it by pid.
struct Service {
    child: Child,
    addr: String,
}

impl Service {
    /// Starts a role on an ephemeral loopback port and reads the address from its `listening` line.
    fn start(args: &[&str]) -> Service {
        let mut child = Command::new(SERVICE)
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("the service starts");
        let mut line = String::new();
        // read_line returns once the service has bound and printed, or at EOF if it died.
        BufReader::new(child.stdout.take().expect("stdout is piped"))
            .read_line(&mut line)
            .expect("stdout is readable");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Service { child, addr }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(SERVICE)
        .arg("client")
        .args(args)
        .output()
        .expect("the client runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn three_tiers() -> (Service, Service, Service) {
    let db = Service::start(&["db"]);
    let api = Service::start(&["api", "--upstream", &db.addr]);
    let web = Service::start(&["web", "--upstream", &api.addr]);
    (db, api, web)
}

#[test]
fn requests_travel_through_all_three_tiers() {
    let (_db, _api, web) = three_tiers();

    let (success, stdout, stderr) = client(&["--target", &web.addr, "--requests", "5"]);

    assert!(
        success,
        "client failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(stdout.trim(), "client: 5/5 answers correct");
}

#[test]
fn web_exec_runs_bash_and_returns_its_output() {
    let (_db, _api, web) = three_tiers();

    let (success, stdout, stderr) =
        client(&["--target", &web.addr, "--exec", "echo one; echo two >&2"]);

    assert!(
        success,
        "client failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(stdout, "one\ntwo\n");
}

#[test]
fn web_exec_reports_a_failing_command() {
    let (_db, _api, web) = three_tiers();

    let (success, _, _) = client(&["--target", &web.addr, "--exec", "exit 3"]);

    assert!(!success, "a command that exits 3 must fail the client");
}

#[test]
fn client_fails_when_the_chain_is_broken() {
    // The api tier's upstream is a port nobody listens on, so every request gets no VALUE back.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .to_string();
    let api = Service::start(&["api", "--upstream", &closed]);
    let web = Service::start(&["web", "--upstream", &api.addr]);

    let (success, stdout, _) = client(&["--target", &web.addr, "--requests", "2"]);

    assert!(
        !success,
        "the client must fail when answers are wrong; stdout:\n{stdout}"
    );
    assert_eq!(stdout.trim(), "client: 0/2 answers correct");
}

#[test]
fn unknown_role_is_rejected_with_usage() {
    let output = Command::new(SERVICE)
        .arg("proxy")
        .output()
        .expect("the service runs");

    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("unknown role \"proxy\""),
        "stderr:\n{stderr}"
    );
    assert!(stderr.contains("usage:"), "stderr:\n{stderr}");
}
