//! Latency from a kernel event to its deviation on the agent's gRPC stream.
//!
//! The probe runs in one cgroup of the agent's scope and `accept-server` in another. The two ends
//! then belong to different components, so the model can leave their flow undeclared, which it
//! cannot do for a flow inside one component. For each sample the probe
//! takes a timestamp, connects to the next of the server's ports and closes, and waits until the
//! stream delivers the deviation for that port. A fresh port per sample gives a fresh deviation
//! id, so the agent never folds a sample into an earlier deviation's count.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;
use driftwatch_proto::v1::agent_service_client::AgentServiceClient;
use driftwatch_proto::v1::stream_deviations_response::Payload;
use driftwatch_proto::v1::{Category, StreamDeviationsRequest};
use serde_json::json;
use tokio::sync::mpsc;

#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    /// The agent's API address (loopback IP:PORT).
    #[arg(long)]
    pub api: SocketAddr,
    /// The accept server's ports, comma-separated; one sample per port.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ports: Vec<u16>,
}

#[derive(clap::Args, Debug)]
pub struct AcceptServerArgs {
    /// Listeners to open, each on a free loopback port.
    #[arg(long, default_value_t = 200)]
    pub ports: u32,
}

/// Opens `ports` listeners on 127.0.0.1, prints `ports P1,P2,...` on stdout, and accepts and
/// closes connections on all of them until killed.
pub fn accept_server(args: &AcceptServerArgs) -> anyhow::Result<String> {
    let mut listeners = Vec::with_capacity(args.ports as usize);
    for _ in 0..args.ports {
        listeners.push(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("failed to listen on 127.0.0.1")?);
    }
    let ports: Vec<String> = listeners.iter().map(|listener| listener.local_addr().map(|address| address.port().to_string())).collect::<Result<_, _>>()?;
    println!("ports {}", ports.join(","));
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    drop(stream);
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(serde_json::json!({ "ports": ports.len() }).to_string())
}

#[derive(clap::Args, Debug)]
pub struct ConnectPortsArgs {
    /// Loopback ports to connect to once each, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ports: Vec<u16>,
}

/// Connects once to each port on 127.0.0.1 and waits for the server to close, so each connection
/// is a complete flow; the fleet benchmark runs it under each agent to raise deviations.
pub fn connect_ports(args: &ConnectPortsArgs) -> anyhow::Result<String> {
    let started = Instant::now();
    for &port in &args.ports {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut client = TcpStream::connect(address).with_context(|| format!("failed to connect to {address}"))?;
        let mut byte = [0u8; 1];
        let _ = client.read(&mut byte);
    }
    Ok(json!({ "connections": args.ports.len(), "seconds": started.elapsed().as_secs_f64() }).to_string())
}

/// How long one sample may wait for its deviation before it counts as missed.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: &LatencyArgs) -> anyhow::Result<String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(measure(args))
}

async fn measure(args: &LatencyArgs) -> anyhow::Result<String> {
    let mut client = AgentServiceClient::connect(format!("http://{}", args.api))
        .await
        .with_context(|| format!("failed to connect to the agent API at {}", args.api))?;
    #[allow(deprecated, reason = "an older field still honoured by agents of every version")]
    let request = StreamDeviationsRequest { exclude_categories: vec![Category::NewListener as i32], ..Default::default() };
    let mut stream = client.stream_deviations(request).await.context("StreamDeviations failed")?.into_inner();

    // The receive time is taken by the task that reads the stream, as soon as a message arrives.
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(u32, Instant)>();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            if let Some(Payload::Deviation(deviation)) = message.payload {
                if let Some(port) = deviation.port {
                    let _ = arrivals.send((port, Instant::now()));
                }
            }
        }
    });

    let mut latencies_us = Vec::with_capacity(args.ports.len());
    let mut missed = 0u32;
    for &server_port in &args.ports {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, server_port));
        let port = u32::from(server_port);

        let started = Instant::now();
        let mut client = TcpStream::connect(address).with_context(|| format!("failed to connect to the accept server at {address}"))?;
        // The server closes first; waiting for that end of file makes the whole exchange happen.
        let mut byte = [0u8; 1];
        let _ = client.read(&mut byte);
        drop(client);

        let deadline = tokio::time::Instant::now() + SAMPLE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, arrived.recv()).await {
                Ok(Some((seen, at))) if seen == port => {
                    latencies_us.push(at.duration_since(started).as_secs_f64() * 1e6);
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) => anyhow::bail!("the agent closed the deviation stream"),
                Err(_) => {
                    missed += 1;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    latencies_us.sort_by(f64::total_cmp);
    Ok(json!({
        "samples": args.ports.len(),
        "missed": missed,
        "p50_us": percentile(&latencies_us, 0.50),
        "p99_us": percentile(&latencies_us, 0.99),
        "max_us": latencies_us.last().copied(),
    })
    .to_string())
}

/// Nearest-rank percentile of sorted values; None when there are none.
fn percentile(sorted: &[f64], quantile: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}
