//! The close of TCP connections that existed before the agent started, when TCP state changes
//! come from `sock_ops`.
//!
//! The `sock_ops` program reports the state changes of a socket only after it asked for them at
//! the socket's connect, listen or accept, which for these connections happened before the
//! agent. So the agent looks for them in the TCP tables of their owner's network namespace once
//! a second, and reports a `Close` for each one that has moved to CLOSE or TIME_WAIT. Such a
//! close carries no byte counts, and it comes up to a second late. When the owner has exited,
//! another process in its namespace gives the tables, because a child may still hold the socket.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::event::{kernel_now_ns, Event, TcpEvent, TcpEventKind};
use crate::state::seed::{open_connections, process_in_netns};

/// How often the tables are read.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A connection found at start-up: (network namespace inode, local address, remote address,
/// owner pid).
pub type SeededConnection = (u32, SocketAddr, SocketAddr, u32);

/// Reports the close of each of `connections` on `sender` until all have closed, `cancel` fires
/// or the receiver is gone.
pub async fn report_closes(
    mut connections: Vec<SeededConnection>,
    proc_root: PathBuf,
    sender: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !connections.is_empty() {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The tables of each namespace, read once per pass.
        let mut tables: HashMap<u32, Option<HashSet<(SocketAddr, SocketAddr)>>> = HashMap::new();
        let mut closed = Vec::new();
        connections.retain(|&(netns, local, remote, pid)| {
            let open = tables
                .entry(netns)
                .or_insert_with(|| {
                    open_connections(&proc_root, pid).or_else(|| {
                        let other = process_in_netns(&proc_root, netns, pid)?;
                        open_connections(&proc_root, other)
                    })
                })
                .as_ref()
                .is_some_and(|open| open.contains(&(local, remote)));
            if !open {
                closed.push(close_event(netns, local, remote, pid));
            }
            open
        });
        for event in closed {
            if sender.send(event).await.is_err() {
                return;
            }
        }
    }
    tracing::debug!("every connection opened before the agent has closed");
}

fn close_event(netns: u32, local: SocketAddr, remote: SocketAddr, pid: u32) -> Event {
    Event::Tcp(TcpEvent {
        ktime_ns: kernel_now_ns(),
        kind: TcpEventKind::Close,
        pid,
        netns,
        local,
        remote,
        sock: 0,
        bytes_sent: 0,
        bytes_received: 0,
        error: 0,
        lineage: None,
        exe_unlinked: false,
        cgroup_id: 0,
    })
}
