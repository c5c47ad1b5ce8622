//! The close of TCP connections and listeners that existed before the agent started, when TCP
//! state changes come from `sock_ops`.
//!
//! The `sock_ops` program reports the state changes of a socket only after it asked for them at
//! the socket's connect, listen or accept, which for these connections happened before the
//! agent. So the agent looks for them in the TCP tables of their owner's network namespace once
//! a second, and reports a `Close` for each one that has moved to CLOSE or TIME_WAIT. Such a
//! close carries no byte counts, and it comes up to a second late. When the owner has exited,
//! another process in its namespace gives the tables, because a child may still hold the socket.
//!
//! A listener that closed leaves its entries in the kernel's listener map. Under a scope, a later
//! listener outside the scope that the same connections reach would then have them charged to
//! the closed one's process. The same reading finds it gone, and its entries are removed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use agent_common::{ListenerKey, ListenerOwner};
use aya::maps::{HashMap as BpfHashMap, MapData};

use super::event::{kernel_now_ns, Event, TcpEvent, TcpEventKind};
use crate::state::seed::{listening_sockets, open_connections, process_in_netns};

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

/// A listener found at start-up: (network namespace inode, socket inode, owner pid, the kernel
/// map keys it was seeded under).
pub type SeededListener = (u32, u64, u32, Vec<ListenerKey>);

/// Removes the kernel map entries of each of `listeners` once it no longer listens, until all
/// have closed or `cancel` fires. An entry that counts several sockets loses one.
pub async fn forget_closed_listeners(
    mut listeners: Vec<SeededListener>,
    proc_root: PathBuf,
    mut map: BpfHashMap<MapData, ListenerKey, ListenerOwner>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !listeners.is_empty() {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut tables: HashMap<u32, Option<HashSet<u64>>> = HashMap::new();
        listeners.retain(|(netns, inode, pid, keys)| {
            let listening = tables
                .entry(*netns)
                .or_insert_with(|| {
                    listening_sockets(&proc_root, *pid).or_else(|| {
                        let other = process_in_netns(&proc_root, *netns, *pid)?;
                        listening_sockets(&proc_root, other)
                    })
                })
                // A namespace with no process left has no listener left either.
                .as_ref()
                .is_some_and(|inodes| inodes.contains(inode));
            if !listening {
                for key in keys {
                    forget_one(&mut map, key);
                }
                tracing::debug!(netns, inode, pid, "a listener opened before the agent closed");
            }
            listening
        });
    }
    tracing::debug!("every listener opened before the agent has closed");
}

fn forget_one(map: &mut BpfHashMap<MapData, ListenerKey, ListenerOwner>, key: &ListenerKey) {
    let result = match map.get(key, 0) {
        Ok(owner) if owner.sockets > 1 => map.insert(*key, ListenerOwner { sockets: owner.sockets - 1, ..owner }, 0),
        Ok(_) => map.remove(key),
        // The kernel removed it already: a listener on that address and port closed, or one
        // outside the scope listened there.
        Err(_) => return,
    };
    if let Err(error) = result {
        tracing::warn!(error = %error, port = key.port, "failed to forget a closed listener in the kernel map");
    }
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
        folded_client: None,
    })
}
