//! An index of entries by last use, so a bounded table can evict the least recently seen entry in
//! logarithmic time instead of scanning.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// Position of one entry in a [`RecencyIndex`]; the sequence number breaks ties between entries
/// seen at the same time, oldest first.
pub(crate) type Stamp = (SystemTime, u64);

#[derive(Debug, Clone)]
pub(crate) struct RecencyIndex<K> {
    order: BTreeMap<Stamp, K>,
    next_sequence: u64,
}

impl<K: Clone> RecencyIndex<K> {
    pub fn new() -> Self {
        RecencyIndex {
            order: BTreeMap::new(),
            next_sequence: 0,
        }
    }

    /// Records that `key` was used at `time`, replacing its previous stamp, and returns the new one.
    pub fn touch(&mut self, previous: Option<Stamp>, time: SystemTime, key: K) -> Stamp {
        if let Some(previous) = previous {
            self.order.remove(&previous);
        }
        let stamp = (time, self.next_sequence);
        self.next_sequence += 1;
        self.order.insert(stamp, key);
        stamp
    }

    /// Removes and returns the least recently used key.
    pub fn pop_oldest(&mut self) -> Option<K> {
        self.order.pop_first().map(|(_, key)| key)
    }

    pub fn clear(&mut self) {
        self.order.clear();
    }
}
