//! The deviation hub: sequence numbers, a bounded replay history and live fan-out to subscribers.
//!
//! The pipeline publishes each deviation once. The hub gives it the next sequence number, keeps it
//! in a ring of the most recent deviations for replay, and sends it to every subscriber over a
//! tokio broadcast channel. A subscriber that reads too slowly falls behind the channel's capacity
//! and loses the oldest messages. It then receives a [`LossNotice`] with the exact range it missed
//! instead of a silent gap. Publishing never waits for a subscriber to read. It holds the history
//! lock only while it appends and sends.
//!
//! Every entry names the node that raised it. An agent's hub holds only its own node's entries. A
//! collector's hub holds the whole fleet's, plus a gap entry wherever a node lost deviations
//! before it could push them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use driftwatch_model::deviation::{Category, Deviation, Severity};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::Stream;

pub use super::filter::{DeviationFilter, FilterSet};

/// Bounds of a [`DeviationHub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Deviations retained for replay; the oldest is evicted when a new one arrives at capacity.
    pub history_capacity: usize,
    /// Deviations buffered per subscriber before the slowest loses the oldest. tokio rounds it up
    /// to a power of two.
    pub subscriber_capacity: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            history_capacity: 4096,
            subscriber_capacity: 1024,
        }
    }
}

/// Start of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replay {
    /// Live deviations only.
    #[default]
    None,
    /// Retained history from this sequence on; 0 means all of it.
    FromSequence(u64),
    /// Retained entries published at or after this time.
    Since(SystemTime),
    /// The latest this many retained deviations that pass the filters.
    Last(u64),
}

/// Cause of a gap in a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossReason {
    /// The subscriber fell more than the subscriber capacity behind the publisher.
    SubscriberLagged,
    /// The requested replay start is older than the oldest retained deviation.
    HistoryEvicted,
}

/// A contiguous range of sequence numbers that a subscriber did not receive.
///
/// The range counts every deviation published in it, so some of them may not have matched the
/// subscriber's filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossNotice {
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub reason: LossReason,
}

impl LossNotice {
    /// Number of deviations in the range.
    pub fn missed(&self) -> u64 {
        self.last_sequence - self.first_sequence + 1
    }
}

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    Deviation {
        sequence: u64,
        /// Node that raised it.
        node: Arc<str>,
        deviation: Arc<Deviation>,
    },
    /// Messages this subscriber did not receive from the hub.
    Loss(LossNotice),
    /// Deviations a node lost before it pushed them to this hub's collector.
    NodeGap { sequence: u64, gap: NodeGap },
}

impl HubMessage {
    /// Returns the message's position in the hub's sequence. For a loss notice that is the last
    /// missed sequence, so a client always resumes one past the last sequence it received.
    pub fn sequence(&self) -> u64 {
        match self {
            HubMessage::Deviation { sequence, .. } => *sequence,
            HubMessage::Loss(notice) => notice.last_sequence,
            HubMessage::NodeGap { sequence, .. } => *sequence,
        }
    }
}

/// A range of a node's own sequences that the node lost before pushing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGap {
    pub node: Arc<str>,
    /// First lost sequence, in the node's numbering.
    pub first_sequence: u64,
    /// Last lost sequence, in the node's numbering.
    pub last_sequence: u64,
}

impl NodeGap {
    /// Number of deviations in the range.
    pub fn missed(&self) -> u64 {
        self.last_sequence - self.first_sequence + 1
    }
}

/// Payload of one history entry.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryItem {
    Deviation {
        node: Arc<str>,
        deviation: Arc<Deviation>,
    },
    NodeGap(NodeGap),
}

/// One entry of the hub's sequence, as it is retained and as a collector journals it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub sequence: u64,
    /// When the hub published it; `since` replays compare with this time.
    pub published_at: SystemTime,
    pub item: EntryItem,
}

impl Entry {
    fn to_message(&self) -> HubMessage {
        match &self.item {
            EntryItem::Deviation { node, deviation } => HubMessage::Deviation {
                sequence: self.sequence,
                node: Arc::clone(node),
                deviation: Arc::clone(deviation),
            },
            EntryItem::NodeGap(gap) => HubMessage::NodeGap {
                sequence: self.sequence,
                gap: gap.clone(),
            },
        }
    }

    /// Returns true when a subscriber with `filter` receives the entry. Gaps always pass, because a
    /// loss is never filtered away.
    fn passes(&self, filter: &FilterSet) -> bool {
        match &self.item {
            EntryItem::Deviation { node, deviation } => filter.matches(node, deviation),
            EntryItem::NodeGap(_) => true,
        }
    }
}

/// A snapshot of the hub's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubCounters {
    /// Deviations published since the hub was created.
    pub published: u64,
    /// Deviations evicted from the replay history to make room for newer ones.
    pub evicted: u64,
    /// Messages subscribers lost because they read too slowly, summed over subscribers.
    pub dropped_slow: u64,
    /// Subscribers connected now.
    pub subscribers: u64,
    /// Sequence of the latest deviation, 0 before the first.
    pub last_sequence: u64,
    /// Sequence of the oldest retained deviation, 0 when the history is empty.
    pub oldest_retained_sequence: u64,
}

/// Errors from [`DeviationHub::subscribe`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error(
        "replay start {requested} is ahead of the newest sequence, {}, so nothing with it was sent yet; \
         if the server restarted after that sequence was read, resume with a full replay instead",
        .next.saturating_sub(1)
    )]
    FromSequenceAhead {
        requested: u64,
        /// Sequence the next entry gets, one past the newest.
        next: u64,
    },
}

type Published = Arc<Entry>;

struct History {
    /// Sequence the next published entry gets. Sequences start at 1.
    next_sequence: u64,
    entries: VecDeque<Published>,
}

/// Counters shared by the hub and its subscriptions.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    /// Published deviations by [`Category::ALL`] index, then [`Severity::ALL`] index.
    published_by_kind: [[AtomicU64; Severity::ALL.len()]; Category::ALL.len()],
    evicted: AtomicU64,
    dropped_slow: AtomicU64,
    subscribers: AtomicU64,
}

/// Sequences deviations, retains the most recent for replay and fans them out to subscribers.
pub struct DeviationHub {
    config: HubConfig,
    /// Node name that [`DeviationHub::publish`] gives its entries.
    node: Arc<str>,
    history: Mutex<History>,
    sender: broadcast::Sender<Published>,
    counters: Arc<Counters>,
}

impl DeviationHub {
    /// Creates a hub with the given bounds whose own entries carry an empty node name.
    /// Capacities of 0 are raised to 1.
    pub fn new(config: HubConfig) -> DeviationHub {
        DeviationHub::with_node(config, "")
    }

    /// Creates a hub whose [`DeviationHub::publish`] names `node` as the origin of each entry.
    pub fn with_node(config: HubConfig, node: &str) -> DeviationHub {
        DeviationHub::restore(config, node, 1, Vec::new())
    }

    /// Creates a hub that continues a sequence: the next entry gets `next_sequence` (at least 1),
    /// and `entries` (oldest first, below `next_sequence`) are retained for replay. A collector
    /// calls it with what its journal kept, so its sequence survives a restart. Entries beyond the
    /// history capacity are dropped from the oldest end.
    pub fn restore(
        config: HubConfig,
        node: &str,
        next_sequence: u64,
        entries: Vec<Entry>,
    ) -> DeviationHub {
        let config = HubConfig {
            history_capacity: config.history_capacity.max(1),
            subscriber_capacity: config.subscriber_capacity.max(1),
        };
        let (sender, _) = broadcast::channel(config.subscriber_capacity);
        let skip = entries.len().saturating_sub(config.history_capacity);
        let mut retained = VecDeque::with_capacity(config.history_capacity);
        retained.extend(entries.into_iter().skip(skip).map(Arc::new));
        DeviationHub {
            config,
            node: Arc::from(node),
            history: Mutex::new(History {
                next_sequence: next_sequence.max(1),
                entries: retained,
            }),
            sender,
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn config(&self) -> HubConfig {
        self.config
    }

    /// Node name this hub gives its own deviations.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Returns the sequence the next published entry gets.
    pub fn next_sequence(&self) -> u64 {
        self.lock_history().next_sequence
    }

    /// Publishes a deviation of this hub's node to the history and to every subscriber, and
    /// returns its sequence.
    pub fn publish(&self, deviation: Deviation) -> u64 {
        let node = Arc::clone(&self.node);
        self.publish_item(
            EntryItem::Deviation {
                node,
                deviation: Arc::new(deviation),
            },
            SystemTime::now(),
        )
    }

    /// Publishes a deviation that `node` raised, as a collector does for each node it receives
    /// from, and returns its sequence.
    pub fn publish_from(&self, node: Arc<str>, deviation: Deviation, published_at: SystemTime) -> u64 {
        let item = EntryItem::Deviation {
            node,
            deviation: Arc::new(deviation),
        };
        self.publish_item(item, published_at)
    }

    /// Publishes a gap in a node's deviations and returns its sequence in this hub.
    pub fn publish_node_gap(&self, gap: NodeGap, published_at: SystemTime) -> u64 {
        self.publish_item(EntryItem::NodeGap(gap), published_at)
    }

    fn publish_item(&self, item: EntryItem, published_at: SystemTime) -> u64 {
        let mut history = self.lock_history();
        let sequence = history.next_sequence;
        history.next_sequence += 1;
        let published = Arc::new(Entry {
            sequence,
            published_at,
            item,
        });

        if history.entries.len() == self.config.history_capacity {
            history.entries.pop_front();
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        history.entries.push_back(Arc::clone(&published));

        // Sending under the history lock keeps the channel in sequence order and lets `subscribe`
        // take a history snapshot and a receiver that neither overlap nor leave a gap.
        // An error only means there is no subscriber right now.
        let kind = match &published.item {
            EntryItem::Deviation { deviation, .. } => Some((deviation.category, deviation.severity)),
            EntryItem::NodeGap(_) => None,
        };
        let _ = self.sender.send(published);
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        if let Some((category, severity)) = kind {
            self.counters.published_by_kind[category_index(category)][severity_index(severity)]
                .fetch_add(1, Ordering::Relaxed);
        }
        sequence
    }

    /// Returns the retained entries, oldest first, for a collector's journal compaction.
    pub fn retained(&self) -> Vec<Entry> {
        self.lock_history()
            .entries
            .iter()
            .map(|entry| Entry::clone(entry))
            .collect()
    }

    /// Subscribes to deviations that match `filter`, replaying retained history from
    /// `from_sequence` when it is set; see [`DeviationHub::subscribe_with`].
    ///
    /// # Errors
    ///
    /// As [`DeviationHub::subscribe_with`].
    pub fn subscribe(
        &self,
        filter: impl Into<FilterSet>,
        from_sequence: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        let replay = from_sequence.map_or(Replay::None, Replay::FromSequence);
        self.subscribe_with(filter.into(), replay)
    }

    /// Subscribes to deviations that pass `filter`.
    ///
    /// The subscription first yields the retained entries that `replay` selects and then follows
    /// live ones. A [`Replay::FromSequence`] start older than the oldest retained entry is
    /// preceded by a [`LossReason::HistoryEvicted`] notice.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::FromSequenceAhead`] when a [`Replay::FromSequence`] start is past the next
    /// sequence, as when a client resumes against a server that has restarted or gives a wrong
    /// sequence.
    pub fn subscribe_with(
        &self,
        filter: FilterSet,
        replay: Replay,
    ) -> Result<Subscription, SubscribeError> {
        let history = self.lock_history();
        let mut pending = VecDeque::new();
        let last_sequence = history.next_sequence - 1;
        let passing = |entry: &&Published| entry.passes(&filter);

        match replay {
            Replay::None => {}
            Replay::FromSequence(from) => {
                if from > history.next_sequence {
                    return Err(SubscribeError::FromSequenceAhead {
                        requested: from,
                        next: history.next_sequence,
                    });
                }
                // Sequence 0 is never assigned, so a start of 0 means the same as 1.
                let from = from.max(1);
                let oldest = history
                    .entries
                    .front()
                    .map_or(history.next_sequence, |entry| entry.sequence);
                if from < oldest {
                    pending.push_back(HubMessage::Loss(LossNotice {
                        first_sequence: from,
                        last_sequence: oldest - 1,
                        reason: LossReason::HistoryEvicted,
                    }));
                }
                let replayed = history
                    .entries
                    .iter()
                    .filter(|entry| entry.sequence >= from)
                    .filter(passing);
                pending.extend(replayed.map(|entry| entry.to_message()));
            }
            Replay::Since(since) => {
                let replayed = history
                    .entries
                    .iter()
                    .filter(|entry| entry.published_at >= since)
                    .filter(passing);
                pending.extend(replayed.map(|entry| entry.to_message()));
            }
            Replay::Last(count) => {
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                let mut latest: Vec<HubMessage> = history
                    .entries
                    .iter()
                    .rev()
                    .filter(passing)
                    .take(count)
                    .map(|entry| entry.to_message())
                    .collect();
                latest.reverse();
                pending.extend(latest);
            }
        }
        let receiver = self.sender.subscribe();
        drop(history);

        self.counters.subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription {
            filter,
            pending,
            live: BroadcastStream::new(receiver),
            last_sequence,
            counters: Arc::clone(&self.counters),
        })
    }

    /// Returns a snapshot of the counters.
    pub fn counters(&self) -> HubCounters {
        let (last_sequence, oldest_retained_sequence) = {
            let history = self.lock_history();
            let oldest = history.entries.front().map_or(0, |entry| entry.sequence);
            (history.next_sequence - 1, oldest)
        };
        HubCounters {
            published: self.counters.published.load(Ordering::Relaxed),
            evicted: self.counters.evicted.load(Ordering::Relaxed),
            dropped_slow: self.counters.dropped_slow.load(Ordering::Relaxed),
            subscribers: self.counters.subscribers.load(Ordering::Relaxed),
            last_sequence,
            oldest_retained_sequence,
        }
    }

    /// Returns the number of deviations published for every category and severity, zeros
    /// included, in the order of [`Category::ALL`] and [`Severity::ALL`].
    pub fn published_by_kind(&self) -> Vec<(Category, Severity, u64)> {
        let mut counts = Vec::with_capacity(Category::ALL.len() * Severity::ALL.len());
        for (category, row) in Category::ALL.iter().zip(&self.counters.published_by_kind) {
            for (severity, count) in Severity::ALL.iter().zip(row) {
                counts.push((*category, *severity, count.load(Ordering::Relaxed)));
            }
        }
        counts
    }

    fn lock_history(&self) -> MutexGuard<'_, History> {
        // A panic while holding the lock cannot leave the history half-updated in a way that
        // matters to readers: at worst one deviation is missing from the ring.
        self.history
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Default for DeviationHub {
    fn default() -> Self {
        DeviationHub::new(HubConfig::default())
    }
}

fn category_index(category: Category) -> usize {
    Category::ALL
        .iter()
        .position(|known| *known == category)
        .expect("Category::ALL lists every category")
}

fn severity_index(severity: Severity) -> usize {
    Severity::ALL
        .iter()
        .position(|known| *known == severity)
        .expect("Severity::ALL lists every severity")
}

/// A stream of [`HubMessage`]s for one subscriber, from [`DeviationHub::subscribe`].
///
/// The stream ends when the hub is dropped. Sequences in it strictly increase.
pub struct Subscription {
    filter: FilterSet,
    /// Replayed history, yielded before any live message.
    pending: VecDeque<HubMessage>,
    live: BroadcastStream<Published>,
    /// Sequence of the last message taken from the live channel, or the hub's last sequence when
    /// the subscription began. A lag notice starts one past it.
    last_sequence: u64,
    counters: Arc<Counters>,
}

impl Stream for Subscription {
    type Item = HubMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<HubMessage>> {
        let this = self.get_mut();
        if let Some(message) = this.pending.pop_front() {
            return Poll::Ready(Some(message));
        }

        loop {
            match Pin::new(&mut this.live).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    this.counters
                        .dropped_slow
                        .fetch_add(missed, Ordering::Relaxed);
                    let notice = LossNotice {
                        first_sequence: this.last_sequence + 1,
                        last_sequence: this.last_sequence + missed,
                        reason: LossReason::SubscriberLagged,
                    };
                    this.last_sequence = notice.last_sequence;
                    return Poll::Ready(Some(HubMessage::Loss(notice)));
                }
                Poll::Ready(Some(Ok(entry))) => {
                    this.last_sequence = entry.sequence;
                    if entry.passes(&this.filter) {
                        return Poll::Ready(Some(entry.to_message()));
                    }
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.counters.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
