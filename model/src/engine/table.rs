//! The deviation table: one entry per deviation id, bounded, deciding which occurrences are
//! returned to the caller and which only update the entry.

use std::time::{Duration, SystemTime};

use crate::deviation::Deviation;
use crate::recency::{RecencyIndex, Stamp};
use crate::FastMap;

#[derive(Debug, Clone)]
struct Entry {
    deviation: Deviation,
    /// When this id was last returned to the caller.
    last_returned: SystemTime,
    stamp: Stamp,
}

/// The outcome of offering one occurrence to the table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Offer {
    /// First occurrence of the id: return it.
    New(Deviation),
    /// A repeat after the repeat interval: return it again, with its count and times.
    Repeat(Deviation),
    /// A repeat within the interval: only counted.
    Quiet,
}

#[derive(Debug, Clone)]
pub(crate) struct DeviationTable {
    entries: FastMap<String, Entry>,
    recency: RecencyIndex<String>,
    max_entries: usize,
    evictions: u64,
}

impl DeviationTable {
    pub fn new(max_entries: usize) -> DeviationTable {
        DeviationTable {
            entries: FastMap::default(),
            recency: RecencyIndex::new(),
            max_entries: max_entries.max(1),
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Folds one occurrence into the table. A repeat takes the newest evidence and summary and
    /// keeps the first `first_seen`; observation times that go backwards never move `last_seen`
    /// back.
    pub fn offer(
        &mut self,
        candidate: Deviation,
        time: SystemTime,
        repeat_interval: Duration,
    ) -> Offer {
        if let Some(entry) = self.entries.get_mut(&candidate.id) {
            let deviation = &mut entry.deviation;
            deviation.count += 1;
            if time > deviation.last_seen {
                deviation.last_seen = time;
            }
            deviation.evidence = candidate.evidence;
            deviation.summary = candidate.summary;
            deviation.severity = deviation.severity.max(candidate.severity);
            entry.stamp = self
                .recency
                .touch(Some(entry.stamp), deviation.last_seen, candidate.id);

            let since_returned = time
                .duration_since(entry.last_returned)
                .unwrap_or(Duration::ZERO);
            if since_returned >= repeat_interval {
                entry.last_returned = time;
                return Offer::Repeat(entry.deviation.clone());
            }
            return Offer::Quiet;
        }

        while self.entries.len() >= self.max_entries {
            let Some(oldest) = self.recency.pop_oldest() else {
                break;
            };
            self.entries.remove(&oldest);
            self.evictions += 1;
        }
        let stamp = self.recency.touch(None, time, candidate.id.clone());
        let entry = Entry {
            deviation: candidate.clone(),
            last_returned: time,
            stamp,
        };
        self.entries.insert(candidate.id.clone(), entry);
        Offer::New(candidate)
    }

    /// Counts `count` more occurrences of each id in `ids` without rebuilding its text, when every
    /// one of them is in the table and was returned less than `repeat_interval` before `time`. Returns
    /// false, changing nothing, when any of them is missing or due to be returned again; the caller
    /// then offers full candidates.
    ///
    /// A repeat counted this way keeps the summary and evidence of the occurrence last returned.
    pub fn count_quiet_repeats(
        &mut self,
        ids: &[String],
        time: SystemTime,
        repeat_interval: Duration,
        count: u64,
    ) -> bool {
        let all_quiet = ids.iter().all(|id| {
            self.entries.get(id).is_some_and(|entry| {
                time.duration_since(entry.last_returned).unwrap_or(Duration::ZERO) < repeat_interval
            })
        });
        if !all_quiet {
            return false;
        }
        for id in ids {
            let Some(entry) = self.entries.get_mut(id) else { continue };
            entry.deviation.count += count;
            if time > entry.deviation.last_seen {
                entry.deviation.last_seen = time;
            }
            entry.stamp = self.recency.touch(Some(entry.stamp), entry.deviation.last_seen, id.clone());
        }
        true
    }

    /// Returns every entry in priority order ([`Deviation::priority_cmp`]).
    pub fn all(&self) -> Vec<Deviation> {
        let mut all: Vec<Deviation> = self.entries.values().map(|e| e.deviation.clone()).collect();
        crate::deviation::sort_by_priority(&mut all);
        all
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.recency.clear();
    }
}
