//! The discrete-event core: virtual time and a binary-heap event queue.
//!
//! Events at the same time run in the order they were scheduled (a
//! sequence number breaks ties), so a run is a pure function of the
//! scenario and its seed.

use std::{
    cmp::Ordering,
    collections::BinaryHeap,
    time::{Duration, Instant},
};

/// Virtual time: nanoseconds since the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub(crate) struct Time(pub(crate) u64);

impl Time {
    pub(crate) const ZERO: Time = Time(0);

    pub(crate) fn from_secs(s: f64) -> Time {
        Time((s.max(0.0) * 1e9).round() as u64)
    }

    pub(crate) fn from_ms(ms: f64) -> Time {
        Time((ms.max(0.0) * 1e6).round() as u64)
    }

    pub(crate) fn secs(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub(crate) fn ms(self) -> f64 {
        self.0 as f64 / 1e6
    }

    pub(crate) fn duration(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    pub(crate) fn of(d: Duration) -> Time {
        Time(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

impl std::ops::Add for Time {
    type Output = Time;
    fn add(self, rhs: Time) -> Time {
        Time(self.0.saturating_add(rhs.0))
    }
}

impl std::ops::Sub for Time {
    type Output = Time;
    fn sub(self, rhs: Time) -> Time {
        Time(self.0.saturating_sub(rhs.0))
    }
}

/// Maps virtual time to the `Instant`s the control machines take: a fixed
/// origin plus the virtual offset. The machines only compare and add
/// instants, so their decisions depend on virtual time alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    origin: Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    pub(crate) fn instant(&self, t: Time) -> Instant {
        self.origin + t.duration()
    }

    /// The virtual time of `at` (an instant before the origin is time 0).
    pub(crate) fn time(&self, at: Instant) -> Time {
        Time::of(at.saturating_duration_since(self.origin))
    }
}

struct Entry<E> {
    at: Time,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    /// Reversed: the heap's greatest entry is the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The event queue: a binary min-heap on (time, sequence).
pub(crate) struct Queue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
    now: Time,
    popped: u64,
}

impl<E> Queue<E> {
    pub(crate) fn new() -> Queue<E> {
        Queue {
            heap: BinaryHeap::with_capacity(1 << 16),
            seq: 0,
            now: Time::ZERO,
            popped: 0,
        }
    }

    /// The current virtual time: that of the last event popped.
    pub(crate) fn now(&self) -> Time {
        self.now
    }

    /// Events popped so far.
    pub(crate) fn popped(&self) -> u64 {
        self.popped
    }

    /// Schedules `event` at `at` (an event in the past runs now).
    pub(crate) fn at(&mut self, at: Time, event: E) {
        self.seq += 1;
        self.heap.push(Entry {
            at: at.max(self.now),
            seq: self.seq,
            event,
        });
    }

    /// Pops the next event at or before `until`, advancing the clock.
    pub(crate) fn pop(&mut self, until: Time) -> Option<E> {
        if self.heap.peek()?.at > until {
            return None;
        }
        let e = self.heap.pop()?;
        self.now = e.at;
        self.popped += 1;
        Some(e.event)
    }

    /// The events waiting, in no particular order.
    pub(crate) fn pending(&self) -> impl Iterator<Item = &E> {
        self.heap.iter().map(|e| &e.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_pop_in_time_then_schedule_order() {
        let mut q = Queue::new();
        q.at(Time(5), 'a');
        q.at(Time(1), 'b');
        q.at(Time(5), 'c');
        q.at(Time(3), 'd');
        let mut out = Vec::new();
        while let Some(e) = q.pop(Time(4)) {
            out.push(e);
        }
        assert_eq!(out, ['b', 'd']);
        assert_eq!(q.now(), Time(3));
        // The past is now.
        q.at(Time(0), 'e');
        while let Some(e) = q.pop(Time(10)) {
            out.push(e);
        }
        assert_eq!(out, ['b', 'd', 'e', 'a', 'c']);
        assert_eq!(q.popped(), 5);
    }

    #[test]
    fn the_clock_round_trips() {
        let c = Clock::new();
        let t = Time::from_secs(12.345_678_9);
        assert_eq!(c.time(c.instant(t)), t);
        assert_eq!(
            c.time(c.instant(t) + Duration::from_millis(1)),
            t + Time::from_ms(1.0)
        );
    }
}
