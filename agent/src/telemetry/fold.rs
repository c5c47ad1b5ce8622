//! Reading the counters of the TCP flows that the kernel folds (see `fold.rs` in the kernel crate).
//!
//! The ring buffer reader reads the map about once a second, right after it has read the ring
//! buffer to the end. A flow's reported connection is written to the ring buffer just after the
//! flow's entry marks it reported, so a count can come before the record of the connection it
//! repeats, by the few microseconds between the two. The pipeline keeps each count waiting for its
//! join and accept windows before it applies it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_common::{FoldCounts, FoldKey, PairedAccept};
use aya::maps::{HashMap as BpfHashMap, MapData};

use super::decode::folded_flow;
use super::event::{kernel_now_ns, Event, FoldEvent};

/// How often the folded counters are read.
pub const READ_INTERVAL: Duration = Duration::from_secs(1);

/// Reads of a flow that saw no change after which its entry is removed, beyond those its fold
/// epoch needs. An idle flow's next connection is then reported again and the entry comes back.
/// An entry with a connection still open stays, so that its close is counted.
const IDLE_READS: u32 = 2;

/// Reads between two sweeps of the map of accepted sockets waiting for their accept.
const SWEEP_READS: u32 = 10;

/// The kernel's map of folded flows and what was last read from it.
pub struct FoldReader {
    map: BpfHashMap<MapData, FoldKey, FoldCounts>,
    /// Accepted sockets of folded pairs waiting for their accept (see [`FoldReader::sweep_paired`]).
    paired: Option<BpfHashMap<MapData, u64, PairedAccept>>,
    /// Reads until the next sweep of `paired`.
    reads_to_sweep: u32,
    /// Age after which an entry of `paired` is removed, in nanoseconds.
    paired_max_age_ns: u64,
    /// Counters as last read, with the number of reads since they last changed.
    last: HashMap<FoldKey, (FoldCounts, u32)>,
    /// Unchanged reads after which an entry is removed.
    idle_reads: u32,
    next_read: Instant,
}

impl FoldReader {
    pub fn new(
        map: BpfHashMap<MapData, FoldKey, FoldCounts>,
        paired: Option<BpfHashMap<MapData, u64, PairedAccept>>,
        window: Duration,
        paired_max_age: Duration,
    ) -> Self {
        // An entry is removed only once its epoch has passed, so that no connect can still be
        // folded into it.
        let epoch_reads = window.as_nanos().div_ceil(READ_INTERVAL.as_nanos()) as u32;
        FoldReader {
            map,
            paired,
            reads_to_sweep: SWEEP_READS,
            paired_max_age_ns: u64::try_from(paired_max_age.as_nanos()).unwrap_or(u64::MAX),
            last: HashMap::new(),
            idle_reads: epoch_reads + IDLE_READS,
            next_read: Instant::now() + READ_INTERVAL,
        }
    }

    /// Removes the entries of `PAIRED_ACCEPTS` older than the maximum age: accepted sockets that
    /// no `accept` system call took (an io_uring accept, or none yet), which would otherwise fill
    /// the map. Returns how many it removed.
    pub fn sweep_paired(&mut self) -> usize {
        let Some(paired) = self.paired.as_mut() else { return 0 };
        let now = kernel_now_ns();
        let max_age = self.paired_max_age_ns;
        let old: Vec<u64> = paired
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, entry)| now.saturating_sub(entry.ktime_ns) > max_age)
            .map(|(socket, _)| socket)
            .collect();
        old.iter().filter(|socket| paired.remove(socket).is_ok()).count()
    }

    /// True when the next read is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_read
    }

    /// Reads every flow and hands one event per flow whose counters changed to `send`. When `send`
    /// returns false, that flow's change is sent again with the next read. Removes the entries of
    /// flows idle for longer than an epoch and a few reads. Every tenth read also sweeps the map
    /// of waiting accepted sockets; returns how many entries that sweep removed.
    pub fn read(&mut self, now: Instant, mut send: impl FnMut(Event) -> bool) -> usize {
        self.next_read = now + READ_INTERVAL;
        self.reads_to_sweep = self.reads_to_sweep.saturating_sub(1);
        let mut swept = 0;
        if self.reads_to_sweep == 0 {
            self.reads_to_sweep = SWEEP_READS;
            swept = self.sweep_paired();
            if swept > 0 {
                tracing::debug!(removed = swept, "removed accepted sockets of folded pairs that no accept took");
            }
        }
        let mut seen = HashMap::with_capacity(self.last.len());
        let mut idle = Vec::new();
        let mut complete = true;
        for entry in self.map.iter() {
            let Ok((key, counts)) = entry else {
                // The walk stops at an error (an entry that went between its two system calls).
                complete = false;
                break;
            };
            let (before, unchanged) = self.last.get(&key).copied().unwrap_or_default();
            let unchanged = if counts == before { unchanged + 1 } else { 0 };
            if unchanged >= self.idle_reads && open_connections(&key, &counts) == 0 {
                idle.push((key, counts));
                continue;
            }
            let sent = difference(&key, &before, &counts).is_none_or(&mut send);
            seen.insert(key, if sent { (counts, unchanged) } else { (before, unchanged) });
        }
        if !complete {
            // Flows the walk did not reach keep what was last read of them.
            for (key, value) in &self.last {
                seen.entry(*key).or_insert(*value);
            }
        }
        for (key, counts) in idle {
            // A flow whose entry changed since the walk keeps it.
            // NOTE: a connection the kernel counts between this lookup and the removal is lost.
            match self.map.get(&key, 0) {
                Ok(now) if now == counts => {
                    let _ = self.map.remove(&key);
                }
                Ok(_) => {
                    seen.insert(key, (counts, 0));
                }
                Err(_) => {}
            }
        }
        self.last = seen;
        swept
    }
}

/// Connections of the flow counted as started and not yet as ended.
fn open_connections(key: &FoldKey, counts: &FoldCounts) -> u64 {
    // A connect taken back stays a folded socket, so its close is counted. An accepted connection
    // taken back is reported from then on, and its close with it.
    let taken_back = if key.direction == agent_common::FOLD_IN { counts.taken_back } else { 0 };
    counts.connects.saturating_sub(counts.failed + counts.closes + taken_back)
}

/// Returns the event for what changed between two reads of a flow's counters, `None` when no
/// connection was counted.
fn difference(key: &FoldKey, before: &FoldCounts, after: &FoldCounts) -> Option<Event> {
    let flow = folded_flow(key)?;
    let delta = |after: u64, before: u64| after.saturating_sub(before);
    let event = FoldEvent {
        flow,
        connects: delta(after.connects, before.connects),
        taken_back: delta(after.taken_back, before.taken_back),
        established: delta(after.established, before.established),
        failed: delta(after.failed, before.failed),
        closes: delta(after.closes, before.closes),
        bytes_sent: delta(after.bytes_sent, before.bytes_sent),
        bytes_received: delta(after.bytes_received, before.bytes_received),
        ktime_ns: after.last_ns,
    };
    let counted = event.connects + event.established + event.failed + event.closes + event.taken_back;
    (counted > 0).then_some(Event::Fold(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{FAMILY_INET, FOLD_IN, FOLD_OUT};
    use std::net::SocketAddr;

    use crate::telemetry::event::FoldedFlow;

    fn key(direction: u16) -> FoldKey {
        let mut key = FoldKey {
            netns: 7,
            pid: 0,
            family: FAMILY_INET,
            direction,
            local_port: 0,
            remote_port: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
            exec: 0,
            _reserved: 0,
        };
        key.remote_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        if direction == FOLD_OUT {
            key.pid = 42;
            key.remote_port = 5432;
        } else {
            key.local_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
            key.local_port = 443;
        }
        key
    }

    #[test]
    fn difference_counts_what_changed_since_the_last_read() {
        let before = FoldCounts { connects: 3, established: 3, closes: 2, bytes_sent: 100, ..FoldCounts::default() };
        let after = FoldCounts {
            connects: 5,
            established: 4,
            failed: 1,
            closes: 4,
            bytes_sent: 160,
            bytes_received: 9,
            last_ns: 77,
            ..FoldCounts::default()
        };
        let Some(Event::Fold(event)) = difference(&key(FOLD_OUT), &before, &after) else { panic!("no event") };
        let server: SocketAddr = "10.0.0.2:5432".parse().unwrap();
        assert_eq!(event.flow, FoldedFlow::Out { netns: 7, pid: 42, server });
        assert_eq!(
            (event.connects, event.established, event.failed, event.closes, event.bytes_sent, event.bytes_received),
            (2, 1, 1, 2, 60, 9)
        );
        assert_eq!(event.ktime_ns, 77);
    }

    #[test]
    fn difference_names_incoming_flow() {
        let after = FoldCounts { connects: 1, ..FoldCounts::default() };
        let Some(Event::Fold(event)) = difference(&key(FOLD_IN), &FoldCounts::default(), &after) else { panic!("no event") };
        assert_eq!(
            event.flow,
            FoldedFlow::In { netns: 7, server: "10.0.0.1:443".parse().unwrap(), client: "10.0.0.2".parse().unwrap() }
        );
    }

    #[test]
    fn difference_without_a_counted_connection_is_none() {
        let counts = FoldCounts { connects: 4, epoch: 9, ..FoldCounts::default() };
        // Only the epoch moved: a connection was reported, none counted.
        let later = FoldCounts { epoch: 10, last_ns: 5, ..counts };
        assert!(difference(&key(FOLD_OUT), &counts, &later).is_none());
    }

    #[test]
    fn difference_carries_connections_taken_back() {
        let before = FoldCounts { connects: 4, ..FoldCounts::default() };
        let after = FoldCounts { connects: 4, taken_back: 1, ..FoldCounts::default() };
        let Some(Event::Fold(event)) = difference(&key(FOLD_IN), &before, &after) else { panic!("no event") };
        assert_eq!((event.connects, event.taken_back), (0, 1));
    }

    #[test]
    fn open_connections_after_ends() {
        let counts = FoldCounts { connects: 10, failed: 2, closes: 5, taken_back: 1, ..FoldCounts::default() };
        assert_eq!(open_connections(&key(FOLD_IN), &counts), 2);
        // An outgoing connect taken back still closes as a folded socket.
        assert_eq!(open_connections(&key(FOLD_OUT), &counts), 3);
        let closed = FoldCounts { closes: 7, ..counts };
        assert_eq!(open_connections(&key(FOLD_IN), &closed), 0);
    }
}
