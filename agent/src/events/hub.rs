//! The event hub: sequence numbers, a bounded replay ring and live fan-out for raw events.
//!
//! It works as the deviation hub does, with a sequence and a ring of its own, and it also tracks
//! which kinds subscribers want. A kind stays wanted for [`EventHubConfig::linger`] after its last
//! subscriber leaves, so that a client that reconnects within that time resumes without a gap.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::Stream;

use super::{EventKind, EventKinds, RawEvent};
use crate::api::filter::FilterSet;
use crate::api::hub::{LossNotice, LossReason, SubscribeError};

/// Bounds of an [`EventHub`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventHubConfig {
    /// Events retained for resuming; the oldest is evicted when a new one arrives at capacity.
    pub history_capacity: usize,
    /// Events buffered per subscriber before a slow one loses the oldest. tokio rounds it up to a
    /// power of two.
    pub subscriber_capacity: usize,
    /// How long a kind is still recorded after its last subscriber left.
    pub linger: Duration,
}

impl Default for EventHubConfig {
    fn default() -> Self {
        EventHubConfig {
            history_capacity: 16_384,
            subscriber_capacity: 4096,
            linger: Duration::from_secs(60),
        }
    }
}

/// One item of an event subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum EventMessage {
    Event {
        sequence: u64,
        node: Arc<str>,
        event: Arc<RawEvent>,
    },
    /// Events this subscriber did not receive; the range is in event sequences.
    Loss(LossNotice),
}

impl EventMessage {
    /// Returns the position in the event sequence; for a loss notice, the last missed sequence.
    pub fn sequence(&self) -> u64 {
        match self {
            EventMessage::Event { sequence, .. } => *sequence,
            EventMessage::Loss(notice) => notice.last_sequence,
        }
    }
}

/// A snapshot of the event hub's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventHubCounters {
    /// Events recorded since the agent started.
    pub published: u64,
    /// Events evicted from the ring to make room for newer ones.
    pub evicted: u64,
    /// Events subscribers lost because they read too slowly, summed over subscribers.
    pub dropped_slow: u64,
    /// Event subscribers connected now.
    pub subscribers: u64,
    /// Sequence of the latest event, 0 before the first.
    pub last_sequence: u64,
    /// Sequence of the oldest retained event, 0 when none is retained.
    pub oldest_retained_sequence: u64,
}

impl EventHubCounters {
    /// Lists the counters as (name, value) for the status call.
    pub fn named(&self) -> Vec<(String, u64)> {
        [
            ("events_published", self.published),
            ("events_evicted", self.evicted),
            ("events_dropped_slow", self.dropped_slow),
            ("events_subscribers", self.subscribers),
            ("events_last_sequence", self.last_sequence),
            ("events_oldest_retained_sequence", self.oldest_retained_sequence),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }
}

type Published = Arc<(u64, Arc<RawEvent>)>;

struct History {
    next_sequence: u64,
    entries: VecDeque<Published>,
}

/// Subscriber interest by kind. `requested` is read on every kernel event, the rest only when a
/// subscriber comes or goes or a kind lingers.
struct Interest {
    /// Kinds recorded now: requested by a subscriber or lingering.
    requested: AtomicU32,
    /// Kinds that no subscriber wants but that are still recorded until their deadline.
    lingering: AtomicU32,
    state: Mutex<InterestState>,
}

#[derive(Default)]
struct InterestState {
    subscribers: [usize; EventKind::ALL.len()],
    linger_until: [Option<Instant>; EventKind::ALL.len()],
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    evicted: AtomicU64,
    dropped_slow: AtomicU64,
    subscribers: AtomicU64,
}

struct Shared {
    linger: Duration,
    interest: Interest,
    counters: Counters,
}

/// Sequences raw events, retains the most recent and fans them out to subscribers.
pub struct EventHub {
    config: EventHubConfig,
    node: Arc<str>,
    history: Mutex<History>,
    sender: broadcast::Sender<Published>,
    shared: Arc<Shared>,
}

impl EventHub {
    /// Creates a hub whose events name `node`. Capacities of 0 are raised to 1.
    pub fn new(config: EventHubConfig, node: &str) -> EventHub {
        let config = EventHubConfig {
            history_capacity: config.history_capacity.max(1),
            subscriber_capacity: config.subscriber_capacity.max(1),
            linger: config.linger,
        };
        let (sender, _) = broadcast::channel(config.subscriber_capacity);
        EventHub {
            config,
            node: Arc::from(node),
            history: Mutex::new(History {
                next_sequence: 1,
                entries: VecDeque::with_capacity(config.history_capacity.min(4096)),
            }),
            sender,
            shared: Arc::new(Shared {
                linger: config.linger,
                interest: Interest {
                    requested: AtomicU32::new(0),
                    lingering: AtomicU32::new(0),
                    state: Mutex::new(InterestState::default()),
                },
                counters: Counters::default(),
            }),
        }
    }

    pub fn config(&self) -> EventHubConfig {
        self.config
    }

    /// Returns true when events of `kind` are to be recorded: a subscriber wants them, or wanted
    /// them less than the linger time ago. Without any subscriber it is one relaxed atomic load.
    pub fn wants(&self, kind: EventKind) -> bool {
        let interest = &self.shared.interest;
        if interest.requested.load(Ordering::Relaxed) & kind.bit() == 0 {
            return false;
        }
        if interest.lingering.load(Ordering::Relaxed) & kind.bit() == 0 {
            return true;
        }
        self.shared.still_lingering(kind, Instant::now())
    }

    /// Records an event and sends it to every subscriber; returns its sequence.
    pub fn publish(&self, event: RawEvent) -> u64 {
        let mut history = lock(&self.history);
        let sequence = history.next_sequence;
        history.next_sequence += 1;
        let published = Arc::new((sequence, Arc::new(event)));
        if history.entries.len() == self.config.history_capacity {
            history.entries.pop_front();
            self.shared.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
        history.entries.push_back(Arc::clone(&published));
        // Sent under the lock so that a subscriber's replay and its live part neither overlap nor
        // leave a gap. An error only means there is no receiver right now.
        let _ = self.sender.send(published);
        self.shared.counters.published.fetch_add(1, Ordering::Relaxed);
        sequence
    }

    /// Subscribes to events of `kinds` that pass `filter`, first replaying retained events from
    /// `from_sequence` when it is set (0 replays all of them).
    ///
    /// # Errors
    ///
    /// [`SubscribeError::FromSequenceAhead`] when `from_sequence` is past the next sequence, as when
    /// a client resumes against an agent that has restarted or gives a wrong sequence.
    pub fn subscribe(
        &self,
        filter: FilterSet,
        kinds: EventKinds,
        from_sequence: Option<u64>,
    ) -> Result<EventSubscription, SubscribeError> {
        let history = lock(&self.history);
        let mut pending = VecDeque::new();
        if let Some(from) = from_sequence {
            if from > history.next_sequence {
                return Err(SubscribeError::FromSequenceAhead {
                    requested: from,
                    next: history.next_sequence,
                });
            }
            let from = from.max(1);
            let oldest = history.entries.front().map_or(history.next_sequence, |entry| entry.0);
            if from < oldest {
                pending.push_back(EventMessage::Loss(LossNotice {
                    first_sequence: from,
                    last_sequence: oldest - 1,
                    reason: LossReason::HistoryEvicted,
                }));
            }
            let replayed = history
                .entries
                .iter()
                .filter(|entry| entry.0 >= from && passes(&filter, kinds, &self.node, &entry.1));
            pending.extend(replayed.map(|entry| self.message(entry)));
        }
        let last_sequence = history.next_sequence - 1;
        let receiver = self.sender.subscribe();
        drop(history);

        self.shared.add_interest(kinds);
        self.shared.counters.subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(EventSubscription {
            filter,
            kinds,
            node: Arc::clone(&self.node),
            pending,
            live: BroadcastStream::new(receiver),
            last_sequence,
            shared: Arc::clone(&self.shared),
        })
    }

    /// Returns a snapshot of the counters.
    pub fn counters(&self) -> EventHubCounters {
        let (last_sequence, oldest_retained_sequence) = {
            let history = lock(&self.history);
            (history.next_sequence - 1, history.entries.front().map_or(0, |entry| entry.0))
        };
        let counters = &self.shared.counters;
        EventHubCounters {
            published: counters.published.load(Ordering::Relaxed),
            evicted: counters.evicted.load(Ordering::Relaxed),
            dropped_slow: counters.dropped_slow.load(Ordering::Relaxed),
            subscribers: counters.subscribers.load(Ordering::Relaxed),
            last_sequence,
            oldest_retained_sequence,
        }
    }

    fn message(&self, entry: &Published) -> EventMessage {
        EventMessage::Event {
            sequence: entry.0,
            node: Arc::clone(&self.node),
            event: Arc::clone(&entry.1),
        }
    }
}

impl Shared {
    fn add_interest(&self, kinds: EventKinds) {
        let interest = &self.interest;
        let mut state = lock(&interest.state);
        for kind in kinds.iter() {
            state.subscribers[kind as usize] += 1;
            state.linger_until[kind as usize] = None;
            interest.lingering.fetch_and(!kind.bit(), Ordering::Relaxed);
            interest.requested.fetch_or(kind.bit(), Ordering::Relaxed);
        }
    }

    fn remove_interest(&self, kinds: EventKinds, now: Instant) {
        let interest = &self.interest;
        let mut state = lock(&interest.state);
        for kind in kinds.iter() {
            let count = &mut state.subscribers[kind as usize];
            *count = count.saturating_sub(1);
            if *count > 0 {
                continue;
            }
            if self.linger.is_zero() {
                interest.requested.fetch_and(!kind.bit(), Ordering::Relaxed);
            } else {
                state.linger_until[kind as usize] = Some(now + self.linger);
                interest.lingering.fetch_or(kind.bit(), Ordering::Relaxed);
            }
        }
    }

    /// Returns true while a lingering kind's deadline has not passed, and stops recording it after.
    fn still_lingering(&self, kind: EventKind, now: Instant) -> bool {
        let interest = &self.interest;
        let mut state = lock(&interest.state);
        match state.linger_until[kind as usize] {
            Some(deadline) if now >= deadline => {
                state.linger_until[kind as usize] = None;
                interest.lingering.fetch_and(!kind.bit(), Ordering::Relaxed);
                interest.requested.fetch_and(!kind.bit(), Ordering::Relaxed);
                false
            }
            // A subscriber came back between the two loads in `wants`.
            _ => interest.requested.load(Ordering::Relaxed) & kind.bit() != 0,
        }
    }
}

fn passes(filter: &FilterSet, kinds: EventKinds, node: &str, event: &RawEvent) -> bool {
    kinds.contains(event.kind) && filter.matches_event(node, event)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step, so a panic cannot leave a half-made change.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stream of [`EventMessage`]s for one subscriber, from [`EventHub::subscribe`]. It ends when
/// the hub is dropped, and its sequences strictly increase.
pub struct EventSubscription {
    filter: FilterSet,
    kinds: EventKinds,
    node: Arc<str>,
    pending: VecDeque<EventMessage>,
    live: BroadcastStream<Published>,
    /// Sequence of the last event taken from the live channel; a lag notice starts one past it.
    last_sequence: u64,
    shared: Arc<Shared>,
}

impl Stream for EventSubscription {
    type Item = EventMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EventMessage>> {
        let this = self.get_mut();
        if let Some(message) = this.pending.pop_front() {
            return Poll::Ready(Some(message));
        }
        loop {
            match Pin::new(&mut this.live).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    this.shared.counters.dropped_slow.fetch_add(missed, Ordering::Relaxed);
                    let notice = LossNotice {
                        first_sequence: this.last_sequence + 1,
                        last_sequence: this.last_sequence + missed,
                        reason: LossReason::SubscriberLagged,
                    };
                    this.last_sequence = notice.last_sequence;
                    return Poll::Ready(Some(EventMessage::Loss(notice)));
                }
                Poll::Ready(Some(Ok(entry))) => {
                    this.last_sequence = entry.0;
                    if passes(&this.filter, this.kinds, &this.node, &entry.1) {
                        return Poll::Ready(Some(EventMessage::Event {
                            sequence: entry.0,
                            node: Arc::clone(&this.node),
                            event: Arc::clone(&entry.1),
                        }));
                    }
                }
            }
        }
    }
}

impl Drop for EventSubscription {
    fn drop(&mut self) {
        self.shared.remove_interest(self.kinds, Instant::now());
        self.shared.counters.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
