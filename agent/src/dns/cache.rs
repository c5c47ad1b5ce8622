//! A bounded cache from IP address to the DNS name a process asked for, with TTLs.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Shortest time a name is kept, whatever its TTL. A process typically connects right after the
/// answer arrives, and answers with a TTL of 0 are common for load-balanced names; the name
/// should still reach that connection's deviation.
pub const MIN_HOLD: Duration = Duration::from_secs(60);
/// Longest time a name is kept, whatever its TTL.
pub const MAX_HOLD: Duration = Duration::from_secs(24 * 60 * 60);

/// Counters of the cache, for the status call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameCacheStats {
    pub entries: u64,
    pub inserted: u64,
    /// Entries removed before their TTL ended because the cache was full.
    pub evicted: u64,
    pub expired: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    expires: Instant,
    /// Insertion number, to tell the current entry from an older one in `order`.
    generation: u64,
}

/// IP address to name, at most `max_entries` of them. When full, the oldest insertion goes.
#[derive(Debug)]
pub struct NameCache {
    max_entries: usize,
    entries: HashMap<IpAddr, Entry>,
    /// Insertions oldest first; an element whose generation no longer matches its entry is stale.
    order: VecDeque<(IpAddr, u64)>,
    next_generation: u64,
    stats: NameCacheStats,
}

impl NameCache {
    /// Creates an empty cache that holds at most `max_entries` (at least one) addresses.
    pub fn new(max_entries: usize) -> NameCache {
        NameCache {
            max_entries: max_entries.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_generation: 0,
            stats: NameCacheStats::default(),
        }
    }

    /// Records that `address` is known as `name` for `ttl`, held between [`MIN_HOLD`] and
    /// [`MAX_HOLD`]. A newer answer for the address replaces the older one.
    pub fn insert(&mut self, address: IpAddr, name: &str, ttl: Duration, now: Instant) {
        let address = address.to_canonical();
        if !self.entries.contains_key(&address) && self.entries.len() >= self.max_entries {
            self.expire(now);
            while self.entries.len() >= self.max_entries {
                let Some((oldest, generation)) = self.order.pop_front() else { break };
                if self.entries.get(&oldest).is_some_and(|entry| entry.generation == generation) {
                    self.entries.remove(&oldest);
                    self.stats.evicted += 1;
                }
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let expires = now + ttl.clamp(MIN_HOLD, MAX_HOLD);
        self.entries.insert(address, Entry { name: name.to_string(), expires, generation });
        self.order.push_back((address, generation));
        self.stats.inserted += 1;
        // Replaced entries leave stale elements behind; drop them once they dominate.
        if self.order.len() > 2 * self.max_entries {
            let entries = &self.entries;
            self.order.retain(|(address, generation)| {
                entries.get(address).is_some_and(|entry| entry.generation == *generation)
            });
        }
    }

    /// Returns the name of `address` unless it expired by `now`.
    pub fn lookup(&self, address: IpAddr, now: Instant) -> Option<&str> {
        self.entries
            .get(&address.to_canonical())
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.name.as_str())
    }

    /// Removes the entries that expired by `now`.
    pub fn expire(&mut self, now: Instant) {
        let before = self.entries.len();
        self.entries.retain(|_, entry| entry.expires > now);
        self.stats.expired += (before - self.entries.len()) as u64;
    }

    pub fn stats(&self) -> NameCacheStats {
        NameCacheStats { entries: self.entries.len() as u64, ..self.stats.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn lookup_returns_name_until_ttl_ends() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        cache.insert(address("198.18.0.1"), "api.test", Duration::from_secs(120), now);
        assert_eq!(cache.lookup(address("198.18.0.1"), now), Some("api.test"));
        let later = now + Duration::from_secs(121);
        assert_eq!(cache.lookup(address("198.18.0.1"), later), None);
        cache.expire(later);
        assert_eq!(cache.stats().expired, 1);
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn short_ttl_is_held_for_minimum() {
        let mut cache = NameCache::new(8);
        let now = Instant::now();
        cache.insert(address("198.18.0.1"), "api.test", Duration::ZERO, now);
        assert_eq!(cache.lookup(address("198.18.0.1"), now + MIN_HOLD - Duration::from_secs(1)), Some("api.test"));
        assert_eq!(cache.lookup(address("198.18.0.1"), now + MIN_HOLD), None);
    }

    #[test]
    fn full_cache_evicts_oldest() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        let ttl = Duration::from_secs(600);
        cache.insert(address("10.0.0.1"), "one.test", ttl, now);
        cache.insert(address("10.0.0.2"), "two.test", ttl, now);
        cache.insert(address("10.0.0.3"), "three.test", ttl, now);
        assert_eq!(cache.lookup(address("10.0.0.1"), now), None);
        assert_eq!(cache.lookup(address("10.0.0.2"), now), Some("two.test"));
        assert_eq!(cache.lookup(address("10.0.0.3"), now), Some("three.test"));
        let stats = cache.stats();
        assert_eq!(stats.evicted, 1);
        assert_eq!(stats.entries, 2);
    }

    #[test]
    fn replaced_entry_is_not_evicted_by_its_old_slot() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        let ttl = Duration::from_secs(600);
        cache.insert(address("10.0.0.1"), "old.test", ttl, now);
        cache.insert(address("10.0.0.2"), "two.test", ttl, now);
        cache.insert(address("10.0.0.1"), "new.test", ttl, now);
        cache.insert(address("10.0.0.3"), "three.test", ttl, now);
        assert_eq!(cache.lookup(address("10.0.0.1"), now), Some("new.test"));
        assert_eq!(cache.lookup(address("10.0.0.2"), now), None);
    }

    #[test]
    fn mapped_address_finds_ipv4_entry() {
        let mut cache = NameCache::new(2);
        let now = Instant::now();
        cache.insert(address("192.0.2.7"), "v4.test", Duration::from_secs(600), now);
        assert_eq!(cache.lookup(address("::ffff:192.0.2.7"), now), Some("v4.test"));
    }

    #[test]
    fn order_queue_stays_bounded_under_replacements() {
        let mut cache = NameCache::new(4);
        let now = Instant::now();
        for round in 0..1000 {
            cache.insert(address("10.0.0.1"), &format!("n{round}.test"), Duration::from_secs(600), now);
        }
        assert!(cache.order.len() <= 8, "{}", cache.order.len());
        assert_eq!(cache.stats().entries, 1);
    }
}
