//! Length limits on the graph's lists while they are decoded.
//!
//! serde builds a `Vec` element by element, so a message whose length prefix
//! claims ten million nodes would be decoded in full (at many times its wire
//! size in memory) before validation could count them. The `Vec` fields of
//! the IR that can be long are read through these functions, which stop at
//! the limit of the decode in progress on this thread (none outside
//! [`with`]).

use std::{cell::Cell, fmt, marker::PhantomData};

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

use crate::ir::{Invoke, Node, Trace};
use nnmesh_protocol::limits::Limits;

/// A list over its limit: (its name, its length when known, the limit).
pub(crate) type Over = (&'static str, Option<usize>, usize);

thread_local! {
    /// (nodes, traces, invokes) allowed in the decode in progress.
    static LIMITS: Cell<Option<(usize, usize, usize)>> = const { Cell::new(None) };
    /// The first list found over its limit (postcard drops the text of
    /// custom errors, so the decode error is rebuilt from this).
    static OVER: Cell<Option<Over>> = const { Cell::new(None) };
}

/// Runs `decode` with `limits` in force on this thread; returns its result
/// and the first list found over its limit, if any.
pub(crate) fn with<T>(limits: &Limits, decode: impl FnOnce() -> T) -> (T, Option<Over>) {
    struct Reset(Option<(usize, usize, usize)>);
    impl Drop for Reset {
        fn drop(&mut self) {
            LIMITS.with(|l| l.set(self.0));
            OVER.with(|o| o.set(None));
        }
    }
    let limits = (limits.max_nodes, limits.max_traces, limits.max_invokes);
    let _reset = Reset(LIMITS.with(|l| l.replace(Some(limits))));
    OVER.with(|o| o.set(None));
    let result = decode();
    (result, OVER.with(Cell::take))
}

struct Bounded<T> {
    what: &'static str,
    limit: Option<usize>,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let limit = self.limit.unwrap_or(usize::MAX);
        let over = |count: Option<usize>| {
            OVER.with(|o| o.set(Some((self.what, count, limit))));
            A::Error::custom(format_args!("more {} than the limit of {limit}", self.what))
        };
        // postcard knows the exact length up front: refuse before reading.
        if let Some(n) = seq.size_hint().filter(|&n| n > limit) {
            return Err(over(Some(n)));
        }
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element()? {
            if out.len() == limit {
                return Err(over(None));
            }
            out.push(item);
        }
        Ok(out)
    }
}

fn bounded<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    de: D,
    what: &'static str,
    pick: fn((usize, usize, usize)) -> usize,
) -> Result<Vec<T>, D::Error> {
    let limit = LIMITS.with(Cell::get).map(pick);
    de.deserialize_seq(Bounded {
        what,
        limit,
        item: PhantomData,
    })
}

pub(crate) fn nodes<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Node>, D::Error> {
    bounded(de, "nodes", |l| l.0)
}

pub(crate) fn traces<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Trace>, D::Error> {
    bounded(de, "traces", |l| l.1)
}

pub(crate) fn invokes<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<Invoke>, D::Error> {
    bounded(de, "invokes", |l| l.2)
}
