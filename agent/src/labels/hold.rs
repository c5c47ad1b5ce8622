//! Observations held back while the labels of their processes' containers are being looked up.
//!
//! A container's first process usually connects within milliseconds of its start, before any
//! runtime could answer. Evaluating that connection at once would attribute it without labels and
//! raise `unknown-component` for a workload the model declares. So the pipeline holds such an
//! observation until the lookup returns, or at most for the hold time, and then evaluates it. The
//! queue is bounded: when it is full, the oldest observation is evaluated at once, with the
//! labels known by then, and counted.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Counters of the hold queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldStats {
    /// Observations held so far.
    pub held: u64,
    /// Observations released because their lookup returned.
    pub released: u64,
    /// Observations released because the hold time passed first; they were evaluated without labels.
    pub expired: u64,
    /// Observations released early because the queue was full.
    pub overflow: u64,
    /// Observations waiting now.
    pub waiting: u64,
}

/// A bounded FIFO queue of held observations.
pub struct HoldQueue<T> {
    queue: VecDeque<(Instant, T)>,
    hold: Duration,
    capacity: usize,
    stats: HoldStats,
}

impl<T> HoldQueue<T> {
    pub fn new(hold: Duration, capacity: usize) -> HoldQueue<T> {
        HoldQueue { queue: VecDeque::new(), hold, capacity: capacity.max(1), stats: HoldStats::default() }
    }

    /// Holds `item`; returns the oldest item when the queue was full, for the caller to evaluate now.
    pub fn push(&mut self, item: T, now: Instant) -> Option<T> {
        let overflow = if self.queue.len() >= self.capacity {
            self.stats.overflow += 1;
            self.queue.pop_front().map(|(_, item)| item)
        } else {
            None
        };
        self.queue.push_back((now, item));
        self.stats.held += 1;
        overflow
    }

    /// Removes and returns, oldest first, every item that `waits` no longer holds back and every
    /// item held for the hold time or longer at `now`.
    pub fn take_ready(&mut self, now: Instant, mut waits: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut ready = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for (since, item) in self.queue.drain(..) {
            if !waits(&item) {
                self.stats.released += 1;
                ready.push(item);
            } else if now.duration_since(since) >= self.hold {
                self.stats.expired += 1;
                ready.push(item);
            } else {
                kept.push_back((since, item));
            }
        }
        self.queue = kept;
        ready
    }

    /// Removes and returns every item, for shutdown.
    pub fn take_all(&mut self) -> Vec<T> {
        self.stats.released += self.queue.len() as u64;
        self.queue.drain(..).map(|(_, item)| item).collect()
    }

    /// Returns when the oldest item's hold time ends, if any item is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queue.front().map(|(since, _)| *since + self.hold)
    }

    pub fn stats(&self) -> HoldStats {
        HoldStats { waiting: self.queue.len() as u64, ..self.stats.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_waits_until_its_lookup_returns() {
        let mut queue = HoldQueue::new(Duration::from_secs(3), 8);
        let now = Instant::now();
        assert!(queue.push("a", now).is_none());
        assert!(queue.take_ready(now, |_| true).is_empty());
        assert_eq!(queue.take_ready(now, |_| false), vec!["a"]);
        assert_eq!(queue.stats().released, 1);
        assert_eq!(queue.stats().waiting, 0);
    }

    #[test]
    fn item_leaves_after_the_hold_time() {
        let mut queue = HoldQueue::new(Duration::from_secs(3), 8);
        let now = Instant::now();
        queue.push("a", now);
        queue.push("b", now + Duration::from_secs(2));
        assert_eq!(queue.next_deadline(), Some(now + Duration::from_secs(3)));
        assert_eq!(queue.take_ready(now + Duration::from_secs(3), |_| true), vec!["a"]);
        assert_eq!(queue.stats().expired, 1);
        assert_eq!(queue.stats().waiting, 1);
    }

    #[test]
    fn full_queue_returns_the_oldest() {
        let mut queue = HoldQueue::new(Duration::from_secs(3), 2);
        let now = Instant::now();
        queue.push(1, now);
        queue.push(2, now);
        assert_eq!(queue.push(3, now), Some(1));
        assert_eq!(queue.stats().overflow, 1);
        assert_eq!(queue.take_all(), vec![2, 3]);
    }

    #[test]
    fn ready_items_keep_their_order() {
        let mut queue = HoldQueue::new(Duration::from_secs(3), 8);
        let now = Instant::now();
        for item in [1, 2, 3, 4] {
            queue.push(item, now);
        }
        assert_eq!(queue.take_ready(now, |item| item % 2 == 0), vec![1, 3]);
        assert_eq!(queue.take_ready(now, |_| false), vec![2, 4]);
    }
}
