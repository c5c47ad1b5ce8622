//! Mutual TLS on the gRPC API, without a kernel: a real tonic server behind `ServerTls` on
//! loopback, certificates generated in the test, and real clients that present a good
//! certificate, none, one from another CA, or speak plaintext.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use driftwatch::api::client::with_tls_advice;
use driftwatch::api::tls::{ServerTls, ServerTlsFiles};
use driftwatch::api::{
    connect, connect_with, serve_on, AgentView, ApiListener, ClientTlsArgs, DeviationHub, ListenAddr,
    StatusSnapshot,
};
use driftwatch_e2e::pki::TestCa;
use driftwatch_model::graph::GraphSnapshot;
use driftwatch_proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct StaticView;

impl AgentView for StaticView {
    fn graph(&self) -> GraphSnapshot {
        GraphSnapshot { nodes: vec![], edges: vec![] }
    }

    fn status(&self) -> StatusSnapshot {
        StatusSnapshot {
            version: "4.5.6".into(),
            started_at: SystemTime::now(),
            hooks: vec![],
            counters: vec![],
            model: None,
        }
    }
}

/// A server's PKI: its CA, a second CA the server does not trust, and the PEM files.
struct Pki {
    dir: tempfile::TempDir,
    server_ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = TestCa::new("driftwatch test CA").unwrap();
        server_ca.write_cert(dir.path(), "ca.pem").unwrap();
        let server = server_ca.issue("agent", &["localhost", "127.0.0.1"]).unwrap();
        server.write(dir.path(), "server").unwrap();
        Pki { dir, server_ca }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn server_files(&self) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server-key.pem"),
            client_ca: self.path("ca.pem"),
        }
    }

    /// Client flags with the server's CA and, when `identity` is given, `<identity>.pem`.
    fn client_args(&self, identity: Option<&str>) -> ClientTlsArgs {
        ClientTlsArgs {
            tls_ca: Some(self.path("ca.pem")),
            tls_cert: identity.map(|stem| self.path(&format!("{stem}.pem"))),
            tls_key: identity.map(|stem| self.path(&format!("{stem}-key.pem"))),
            tls_server_name: None,
            insecure: false,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

struct TlsAgent {
    addr: ListenAddr,
    tls: ServerTls,
    shutdown: CancellationToken,
    server: JoinHandle<anyhow::Result<()>>,
}

impl TlsAgent {
    async fn start(pki: &Pki) -> TlsAgent {
        let tls = ServerTls::load(&pki.server_files()).expect("load the server's TLS files");
        let listener = ApiListener::bind(&"127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .with_tls(tls.clone())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(listener, Arc::new(DeviationHub::default()), Arc::new(StaticView), shutdown.clone()));
        TlsAgent { addr, tls, shutdown, server }
    }

    /// Connects with `args` and requests the status. Returns the version, or the error chain as
    /// one line, as the command line prints it.
    async fn status_with(&self, args: &ClientTlsArgs) -> Result<String, String> {
        let call = async {
            let mut client = connect_with(&self.addr, args).await?;
            let status = client
                .get_status(pb::GetStatusRequest {})
                .await
                .map_err(|status| with_tls_advice(anyhow::Error::new(status), &self.addr))?;
            anyhow::Ok(status.into_inner().version)
        };
        tokio::time::timeout(STEP_TIMEOUT, call)
            .await
            .expect("the call ends within the timeout")
            .map_err(|error| format!("{error:#}"))
    }

    /// Waits until the server has counted `expected` failed handshakes. The handshake task updates
    /// the count, and it may finish after the client already saw its error.
    async fn wait_for_handshake_failures(&self, expected: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        while self.tls.handshake_failures() < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.tls.handshake_failures()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(STEP_TIMEOUT, self.server).await.unwrap().unwrap();
        result.expect("server exits cleanly");
    }
}

#[tokio::test]
async fn client_with_certificate_from_server_ca_is_accepted() {
    let pki = Pki::new();
    pki.server_ca.issue("operator", &["operator"]).unwrap().write(pki.dir(), "client").unwrap();
    let agent = TlsAgent::start(&pki).await;

    let version = agent.status_with(&pki.client_args(Some("client"))).await;
    assert_eq!(version, Ok("4.5.6".to_string()));
    assert_eq!(agent.tls.handshake_failures(), 0);
    agent.stop().await;
}

#[tokio::test]
async fn client_without_certificate_is_rejected() {
    let pki = Pki::new();
    let agent = TlsAgent::start(&pki).await;

    let error = agent.status_with(&pki.client_args(None)).await.unwrap_err();
    assert!(error.contains("the server requires a client certificate: pass --tls-cert and --tls-key"), "{error}");
    assert_eq!(agent.wait_for_handshake_failures(1).await, 1);
    agent.stop().await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    let pki = Pki::new();
    let other_ca = TestCa::new("some other CA").unwrap();
    other_ca.issue("intruder", &["intruder"]).unwrap().write(pki.dir(), "intruder").unwrap();
    let agent = TlsAgent::start(&pki).await;

    let error = agent.status_with(&pki.client_args(Some("intruder"))).await.unwrap_err();
    assert!(error.contains("it must be signed by a CA in the server's --tls-client-ca"), "{error}");
    assert_eq!(agent.wait_for_handshake_failures(1).await, 1);
    agent.stop().await;
}

#[tokio::test]
async fn plaintext_client_is_rejected() {
    let pki = Pki::new();
    let agent = TlsAgent::start(&pki).await;

    let result = tokio::time::timeout(STEP_TIMEOUT, async {
        let mut client = connect(&agent.addr).await?;
        anyhow::Ok(client.get_status(pb::GetStatusRequest {}).await?)
    })
    .await
    .expect("the call ends within the timeout");
    assert!(result.is_err(), "a plaintext client got an answer: {result:?}");
    assert_eq!(agent.wait_for_handshake_failures(1).await, 1);
    agent.stop().await;
}

#[tokio::test]
async fn unknown_server_ca_is_rejected() {
    let pki = Pki::new();
    pki.server_ca.issue("operator", &["operator"]).unwrap().write(pki.dir(), "client").unwrap();
    let agent = TlsAgent::start(&pki).await;
    let other_ca = TestCa::new("some other CA").unwrap();
    other_ca.write_cert(pki.dir(), "other-ca.pem").unwrap();

    let mut args = pki.client_args(Some("client"));
    args.tls_ca = Some(pki.path("other-ca.pem"));
    let error = agent.status_with(&args).await.unwrap_err();
    assert!(error.contains("the server's certificate is not signed by a CA in --tls-ca"), "{error}");
    agent.stop().await;
}

#[tokio::test]
async fn plaintext_to_remote_address_needs_insecure() {
    let addr: ListenAddr = "192.0.2.1:7443".parse().unwrap();
    let error = connect_with(&addr, &ClientTlsArgs::default()).await.unwrap_err();
    assert!(error.to_string().contains("refusing to connect in plaintext"), "{error}");
}
