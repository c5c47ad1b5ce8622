//! The deviation hub: sequence numbers, a bounded replay history and live fan-out to subscribers.
//!
//! The pipeline publishes each deviation once. The hub gives it the next sequence number, keeps it
//! in a ring of the most recent deviations for replay, and sends it to every subscriber over a
//! tokio broadcast channel. A subscriber that reads too slowly falls behind the channel's capacity
//! and loses the oldest messages. It then receives a [`LossNotice`] with the exact range it missed
//! instead of a silent gap. Publishing never waits for a subscriber to read. It holds the history
//! lock only while it appends and sends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use driftwatch_model::deviation::{Category, Deviation, Severity};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::Stream;

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

/// Conditions a deviation must meet to reach a subscriber. Every condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviationFilter {
    /// Lowest severity sent; `None` sends every severity.
    pub min_severity: Option<Severity>,
    /// Categories sent; empty sends every category.
    pub categories: Vec<Category>,
    /// Categories never sent, even when `categories` lists them.
    pub exclude_categories: Vec<Category>,
}

impl DeviationFilter {
    /// Returns true when `deviation` passes every condition of the filter.
    pub fn matches(&self, deviation: &Deviation) -> bool {
        if self
            .min_severity
            .is_some_and(|min| deviation.severity < min)
        {
            return false;
        }
        if !self.categories.is_empty() && !self.categories.contains(&deviation.category) {
            return false;
        }
        !self.exclude_categories.contains(&deviation.category)
    }
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
        deviation: Arc<Deviation>,
    },
    Loss(LossNotice),
}

impl HubMessage {
    /// Returns the message's position in the hub's sequence. For a loss notice that is the last
    /// missed sequence, so a client always resumes one past the last sequence it received.
    pub fn sequence(&self) -> u64 {
        match self {
            HubMessage::Deviation { sequence, .. } => *sequence,
            HubMessage::Loss(notice) => notice.last_sequence,
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
        "replay start {requested} is past the next sequence {next}; the agent has restarted since \
         that sequence was sent, so resume with a full replay instead"
    )]
    FromSequenceAhead { requested: u64, next: u64 },
}

type Published = (u64, Arc<Deviation>);

struct History {
    /// Sequence the next published deviation gets. Sequences start at 1.
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
    history: Mutex<History>,
    sender: broadcast::Sender<Published>,
    counters: Arc<Counters>,
}

impl DeviationHub {
    /// Creates a hub with the given bounds. Capacities of 0 are raised to 1.
    pub fn new(config: HubConfig) -> DeviationHub {
        let config = HubConfig {
            history_capacity: config.history_capacity.max(1),
            subscriber_capacity: config.subscriber_capacity.max(1),
        };
        let (sender, _) = broadcast::channel(config.subscriber_capacity);
        DeviationHub {
            config,
            history: Mutex::new(History {
                next_sequence: 1,
                entries: VecDeque::with_capacity(config.history_capacity),
            }),
            sender,
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn config(&self) -> HubConfig {
        self.config
    }

    /// Publishes a deviation to the history and to every subscriber, and returns its sequence.
    pub fn publish(&self, deviation: Deviation) -> u64 {
        let mut history = self.lock_history();
        let sequence = history.next_sequence;
        history.next_sequence += 1;
        let published = (sequence, Arc::new(deviation));

        if history.entries.len() == self.config.history_capacity {
            history.entries.pop_front();
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        history.entries.push_back(published.clone());

        // Sending under the history lock keeps the channel in sequence order and lets `subscribe`
        // take a history snapshot and a receiver that neither overlap nor leave a gap.
        // An error only means there is no subscriber right now.
        let (category, severity) = (published.1.category, published.1.severity);
        let _ = self.sender.send(published);
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        self.counters.published_by_kind[category_index(category)][severity_index(severity)]
            .fetch_add(1, Ordering::Relaxed);
        sequence
    }

    /// Subscribes to deviations that match `filter`.
    ///
    /// With `from_sequence` set, the subscription first yields the retained deviations with a
    /// sequence at or above it, preceded by a [`LossReason::HistoryEvicted`] notice when some of
    /// them were already evicted, and then follows live deviations. Without it, the subscription
    /// follows live deviations only.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::FromSequenceAhead`] when `from_sequence` is past the next sequence, which
    /// happens when a client resumes against an agent that has restarted.
    pub fn subscribe(
        &self,
        filter: DeviationFilter,
        from_sequence: Option<u64>,
    ) -> Result<Subscription, SubscribeError> {
        let history = self.lock_history();
        let mut pending = VecDeque::new();
        let last_sequence = history.next_sequence - 1;

        if let Some(from) = from_sequence {
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
                .map_or(history.next_sequence, |(seq, _)| *seq);
            if from < oldest {
                pending.push_back(HubMessage::Loss(LossNotice {
                    first_sequence: from,
                    last_sequence: oldest - 1,
                    reason: LossReason::HistoryEvicted,
                }));
            }
            for (sequence, deviation) in history.entries.iter() {
                if *sequence >= from && filter.matches(deviation) {
                    pending.push_back(HubMessage::Deviation {
                        sequence: *sequence,
                        deviation: Arc::clone(deviation),
                    });
                }
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
            let oldest = history.entries.front().map_or(0, |(seq, _)| *seq);
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
    filter: DeviationFilter,
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
                Poll::Ready(Some(Ok((sequence, deviation)))) => {
                    this.last_sequence = sequence;
                    if this.filter.matches(&deviation) {
                        return Poll::Ready(Some(HubMessage::Deviation {
                            sequence,
                            deviation,
                        }));
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
