//! Route search: the cheapest chain of stages covering a range of layers.
//!
//! Pure and deterministic: a client picks the same route from the same
//! records every time, and the simulator shares it.
//!
//! # Cost model
//!
//! The layer boundaries are the vertices of a graph. A [`Candidate`]
//! holding layers `[s, e)` can run any part `[u, v)` of them (a stage
//! serves part of what it holds), an edge `u → v` that costs the time, in
//! milliseconds, to push one token through it:
//!
//! ```text
//! cost = rtt_ms + (v - u) * 1000 / max(throughput, 1e-3) * (1 + load)
//! ```
//!
//! - `rtt_ms`: network round trip to the peer (one hand-off per leg);
//! - `(v - u) * 1000 / throughput`: compute time of the layers, reading
//!   `throughput` as tokens per second through one layer;
//! - `(1 + load)`: queueing, with `load` the peer's queue fullness in 0..1.
//!
//! A route is a shortest path from the range's first boundary to its last
//! (Dijkstra; costs are non-negative). Candidates with an empty or
//! out-of-range span or a non-finite cost (e.g. a NaN input) are ignored;
//! negative `rtt_ms` and `load` count as 0. Ties are broken by the peer id
//! (then the candidate index and the leg's end) of the last leg into each
//! boundary, so the result does not depend on hash order or floating-point
//! noise in the inputs' order.

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
};

use nnmesh_protocol::{PeerId, Span};

/// A peer holding a contiguous span of layers, as seen by the router.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer.
    pub peer: PeerId,
    /// The layers it holds (it can run any part of them).
    pub span: Span,
    /// Tokens per second through one of its layers.
    pub throughput: f32,
    /// Round-trip time to the peer, milliseconds.
    pub rtt_ms: f32,
    /// Queue fullness, 0..1.
    pub load: f32,
}

/// One leg of a route: a candidate and the layers it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leg {
    /// Index of the candidate.
    pub candidate: usize,
    /// The layers it runs on this route (part or all of its span).
    pub span: Span,
}

impl Candidate {
    /// The cost of running `layers` on this candidate (see the [module
    /// docs](self)); infinite if any input is NaN.
    pub fn cost(&self, layers: u32) -> f32 {
        if self.rtt_ms.is_nan() || self.throughput.is_nan() || self.load.is_nan() {
            return f32::INFINITY;
        }
        self.rtt_ms.max(0.0)
            + layers as f32 * 1000.0 / self.throughput.max(1e-3) * (1.0 + self.load.max(0.0))
    }
}

/// Distance label: (legs on penalized peers, summed cost). Compared
/// lexicographically, so the penalty dominates.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Dist {
    penalty: u32,
    cost: f64,
}

impl Dist {
    fn cmp(&self, other: &Dist) -> Ordering {
        self.penalty
            .cmp(&other.penalty)
            .then(self.cost.total_cmp(&other.cost))
    }
}

#[derive(Debug, PartialEq)]
struct Entry {
    dist: Dist,
    boundary: u32,
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.dist
            .cmp(&other.dist)
            .then(self.boundary.cmp(&other.boundary))
    }
}

/// Dijkstra over the boundaries of `range`. `penalized(i)` marks candidates
/// whose use is minimized first; `usable(i)` filters candidates out.
fn shortest(
    cands: &[Candidate],
    range: Span,
    usable: impl Fn(usize) -> bool,
    penalized: impl Fn(usize) -> bool,
) -> Option<Vec<Leg>> {
    if range.is_empty() {
        return Some(Vec::new());
    }
    let (lo, hi) = (range.start, range.end);
    let n = (hi - lo) as usize;
    // Candidates holding each layer of the range.
    let mut holding: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, c) in cands.iter().enumerate() {
        if c.span.is_empty() || !c.cost(1).is_finite() || !usable(i) {
            continue;
        }
        for l in c.span.start.max(lo)..c.span.end.min(hi) {
            holding[(l - lo) as usize].push(i);
        }
    }
    let mut dist: Vec<Option<Dist>> = vec![None; n + 1];
    let mut pred: Vec<Option<Leg>> = vec![None; n + 1];
    let mut done = vec![false; n + 1];
    let mut heap = BinaryHeap::new();
    let zero = Dist {
        penalty: 0,
        cost: 0.0,
    };
    dist[0] = Some(zero);
    heap.push(Reverse(Entry {
        dist: zero,
        boundary: lo,
    }));
    while let Some(Reverse(Entry { dist: d, boundary })) = heap.pop() {
        let u = (boundary - lo) as usize;
        if done[u] {
            continue;
        }
        done[u] = true;
        if u == n {
            break;
        }
        for &i in &holding[u] {
            let c = &cands[i];
            for end in boundary + 1..=c.span.end.min(hi) {
                let v = (end - lo) as usize;
                if done[v] {
                    continue;
                }
                let leg = Leg {
                    candidate: i,
                    span: Span::new(boundary, end),
                };
                let nd = Dist {
                    penalty: d.penalty + u32::from(penalized(i)),
                    cost: d.cost + f64::from(c.cost(end - boundary)),
                };
                let better = match (dist[v], pred[v]) {
                    (Some(old), Some(p)) => match nd.cmp(&old) {
                        Ordering::Less => true,
                        Ordering::Greater => false,
                        Ordering::Equal => {
                            (&c.peer, i, leg.span.start)
                                < (&cands[p.candidate].peer, p.candidate, p.span.start)
                        }
                    },
                    _ => true,
                };
                if better {
                    dist[v] = Some(nd);
                    pred[v] = Some(leg);
                    heap.push(Reverse(Entry {
                        dist: nd,
                        boundary: end,
                    }));
                }
            }
        }
    }
    dist[n]?;
    let mut route = Vec::new();
    let mut at = n;
    while at != 0 {
        let leg = pred[at].expect("a reached boundary has a predecessor");
        route.push(leg);
        at = (leg.span.start - lo) as usize;
    }
    route.reverse();
    Some(route)
}

/// Finds the cheapest route through `layers`, as legs in layer order (each
/// running part or all of a candidate's span), using no peer listed in
/// `exclude`.
///
/// Returns `None` if the usable candidates leave a gap, and `Some(vec![])`
/// for an empty range.
pub fn find_route(cands: &[Candidate], layers: Span, exclude: &[PeerId]) -> Option<Vec<Leg>> {
    shortest(
        cands,
        layers,
        |i| !exclude.contains(&cands[i].peer),
        |_| false,
    )
}

/// The cheapest single candidate holding all of `layers` (ties to the
/// lowest peer id), leaving out `exclude`: a second opinion on a hop
/// (redundant execution), or a replacement that must be one holder.
pub fn best_holder(cands: &[Candidate], layers: Span, exclude: &[PeerId]) -> Option<usize> {
    if layers.is_empty() {
        return None;
    }
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.span.start <= layers.start && layers.end <= c.span.end && !exclude.contains(&c.peer)
        })
        .map(|(i, c)| (c.cost(layers.len()), c.peer, i))
        .filter(|(cost, ..)| cost.is_finite())
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .map(|(.., i)| i)
}

/// Finds a second route for `primary` (legs over `cands`): the cheapest
/// route that uses no peer of `primary`; where no such route exists, the
/// cheapest among those using the fewest legs on `primary`'s peers.
///
/// Returns `None` if no route exists or the only one found is `primary`
/// itself (so there is nothing to keep warm).
pub fn disjoint_backup(
    cands: &[Candidate],
    layers: Span,
    primary: &[Leg],
    exclude: &[PeerId],
) -> Option<Vec<Leg>> {
    let used: Vec<&PeerId> = primary
        .iter()
        .filter_map(|l| cands.get(l.candidate).map(|c| &c.peer))
        .collect();
    let backup = shortest(
        cands,
        layers,
        |i| !exclude.contains(&cands[i].peer),
        |i| used.contains(&&cands[i].peer),
    )?;
    (backup != primary).then_some(backup)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A deterministic peer id from a one-byte seed.
    fn peer(seed: u8) -> PeerId {
        libp2p_identity::Keypair::ed25519_from_bytes([seed; 32])
            .expect("32 bytes")
            .public()
            .to_peer_id()
    }

    fn cand(p: u8, start: u32, end: u32, throughput: f32) -> Candidate {
        Candidate {
            peer: peer(p),
            span: Span::new(start, end),
            throughput,
            rtt_ms: 10.0,
            load: 0.0,
        }
    }

    fn all(n: u32) -> Span {
        Span::new(0, n)
    }

    fn idx(route: Option<Vec<Leg>>) -> Option<Vec<usize>> {
        route.map(|r| r.into_iter().map(|l| l.candidate).collect())
    }

    fn route_cost(cands: &[Candidate], route: &[Leg]) -> f64 {
        route
            .iter()
            .map(|l| f64::from(cands[l.candidate].cost(l.span.len())))
            .sum()
    }

    fn covers(cands: &[Candidate], route: &[Leg], range: Span) -> bool {
        let mut at = range.start;
        for l in route {
            let held = cands[l.candidate].span;
            if l.span.start != at
                || l.span.is_empty()
                || l.span.start < held.start
                || l.span.end > held.end
            {
                return false;
            }
            at = l.span.end;
        }
        at == range.end
    }

    #[test]
    fn best_holder_covers_the_whole_range_alone() {
        let cands = [
            cand(1, 0, 10, 100.0),
            cand(2, 0, 20, 50.0),
            cand(3, 5, 20, 500.0),
            cand(4, 10, 20, 900.0),
        ];
        // Only 1 and 2 hold 0..10; 1 is faster.
        assert_eq!(best_holder(&cands, Span::new(0, 10), &[]), Some(0));
        assert_eq!(best_holder(&cands, Span::new(0, 10), &[peer(1)]), Some(1));
        assert_eq!(
            best_holder(&cands, Span::new(0, 10), &[peer(1), peer(2)]),
            None
        );
        // 4 is fastest for 10..20 but 3 and 2 also hold it.
        assert_eq!(best_holder(&cands, Span::new(10, 20), &[peer(4)]), Some(2));
        assert_eq!(best_holder(&cands, Span::new(3, 3), &[]), None);
    }

    #[test]
    fn prefers_one_fast_hop_over_two() {
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(3, 0, 30, 1000.0),
        ];
        assert_eq!(idx(find_route(&cands, all(30), &[])), Some(vec![2]));
        assert_eq!(
            idx(find_route(&cands, all(30), &[peer(3)])),
            Some(vec![0, 1])
        );
    }

    #[test]
    fn gap_means_no_route() {
        let cands = vec![cand(1, 0, 10, 100.0), cand(2, 11, 30, 100.0)];
        assert_eq!(find_route(&cands, all(30), &[]), None);
        assert_eq!(find_route(&[], all(0), &[]), Some(vec![]));
    }

    #[test]
    fn parts_of_spans_cover_a_range() {
        // A replacement for layers 10..20: a node holding 5..25 runs 10..20.
        let cands = vec![cand(1, 0, 10, 100.0), cand(2, 5, 25, 100.0)];
        let r = find_route(&cands, Span::new(10, 20), &[]).expect("covered");
        assert_eq!(
            r,
            [Leg {
                candidate: 1,
                span: Span::new(10, 20)
            }]
        );
        // Overlapping spans chain at any boundary.
        let cands = vec![cand(1, 0, 20, 100.0), cand(2, 12, 30, 100.0)];
        let r = find_route(&cands, all(30), &[]).expect("covered");
        assert!(covers(&cands, &r, all(30)), "{r:?}");
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn ignores_bad_candidates() {
        let mut nan = cand(9, 0, 30, 1e9);
        nan.rtt_ms = f32::NAN;
        let cands = vec![
            cand(1, 0, 40, 1e9),
            cand(2, 5, 5, 1e9),
            nan,
            cand(3, 0, 30, 1.0),
        ];
        // A span reaching past the range is usable for its part in it.
        assert_eq!(idx(find_route(&cands, all(30), &[])), Some(vec![0]));
        let without = &cands[1..];
        assert_eq!(idx(find_route(without, all(30), &[])), Some(vec![2]));
    }

    #[test]
    fn ties_break_by_peer_id() {
        let a = vec![
            cand(7, 0, 30, 100.0),
            cand(3, 0, 30, 100.0),
            cand(5, 0, 30, 100.0),
        ];
        let least = (0..3).min_by_key(|&i| a[i].peer).expect("three");
        assert_eq!(idx(find_route(&a, all(30), &[])), Some(vec![least]));
        let mut b = a.clone();
        b.reverse();
        assert_eq!(idx(find_route(&b, all(30), &[])), Some(vec![2 - least]));
    }

    #[test]
    fn backup_avoids_primary_peers() {
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(3, 0, 15, 50.0),
            cand(4, 15, 30, 50.0),
        ];
        let primary = find_route(&cands, all(30), &[]).expect("a route");
        assert_eq!(idx(Some(primary.clone())), Some(vec![0, 1]));
        assert_eq!(
            idx(disjoint_backup(&cands, all(30), &primary, &[])),
            Some(vec![2, 3])
        );
    }

    #[test]
    fn backup_shares_as_little_as_possible() {
        // Only peer 1 serves 0..15: the backup must reuse it, but not peer 2.
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(4, 15, 30, 10.0),
        ];
        let primary = find_route(&cands, all(30), &[]).expect("a route");
        assert_eq!(
            idx(disjoint_backup(&cands, all(30), &primary, &[])),
            Some(vec![0, 2])
        );
        // A single route: nothing to fall back to.
        let single = vec![cand(1, 0, 30, 100.0)];
        let only = find_route(&single, all(30), &[]).expect("a route");
        assert_eq!(disjoint_backup(&single, all(30), &only, &[]), None);
    }

    /// The cheapest cost over all routes, by dynamic programming over
    /// boundaries (every candidate, every part of its span).
    fn brute_force(
        cands: &[Candidate],
        range: Span,
        usable: impl Fn(usize) -> bool,
    ) -> Option<f64> {
        let n = range.len() as usize;
        let mut best: Vec<Option<f64>> = vec![None; n + 1];
        best[0] = Some(0.0);
        for u in 0..n {
            let Some(base) = best[u] else { continue };
            let at = range.start + u as u32;
            for (i, c) in cands.iter().enumerate() {
                if !usable(i) || !c.span.contains(at) || !c.cost(1).is_finite() {
                    continue;
                }
                for end in at + 1..=c.span.end.min(range.end) {
                    let v = (end - range.start) as usize;
                    let cost = base + f64::from(c.cost(end - at));
                    if best[v].is_none_or(|b| cost < b) {
                        best[v] = Some(cost);
                    }
                }
            }
        }
        best[n]
    }

    fn candidates(num_layers: u32) -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec(
            (
                0u8..6,
                0..num_layers,
                1..=num_layers,
                1.0f32..1000.0,
                0.0f32..100.0,
                0.0f32..1.0,
            ),
            0..10,
        )
        .prop_map(move |v| {
            v.into_iter()
                .map(|(p, start, len, throughput, rtt_ms, load)| Candidate {
                    peer: peer(p),
                    span: Span::new(start, (start + len).min(num_layers)),
                    throughput,
                    rtt_ms,
                    load,
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn route_is_contiguous_and_minimal(
            (num_layers, cands) in (1u32..8).prop_flat_map(|n| (Just(n), candidates(n))),
            excluded in proptest::option::of(0u8..6),
            lo in 0u32..8,
            len in 0u32..8,
        ) {
            let exclude: Vec<PeerId> = excluded.map(peer).into_iter().collect();
            let start = lo.min(num_layers);
            let range = Span::new(start, (start + len).min(num_layers));
            let usable = |i: usize| !exclude.contains(&cands[i].peer);
            let best = brute_force(&cands, range, usable);
            match find_route(&cands, range, &exclude) {
                None => prop_assert!(best.is_none()),
                Some(route) => {
                    prop_assert!(covers(&cands, &route, range));
                    prop_assert!(route.iter().all(|l| usable(l.candidate)));
                    let best = best.expect("brute force finds a route too");
                    let cost = route_cost(&cands, &route);
                    prop_assert!((cost - best).abs() <= 1e-6 * best.max(1.0),
                        "cost {} vs brute force {}", cost, best);
                }
            }
        }

        #[test]
        fn backup_is_a_valid_route(
            (num_layers, cands) in (1u32..8).prop_flat_map(|n| (Just(n), candidates(n))),
        ) {
            let range = all(num_layers);
            let Some(primary) = find_route(&cands, range, &[]) else {
                return Ok(());
            };
            let used: Vec<PeerId> = primary.iter().map(|l| cands[l.candidate].peer).collect();
            let disjoint_exists = find_route(&cands, range, &used).is_some();
            match disjoint_backup(&cands, range, &primary, &[]) {
                // If a fully disjoint route exists, the backup is one.
                None => prop_assert!(!disjoint_exists),
                Some(backup) => {
                    prop_assert!(covers(&cands, &backup, range));
                    prop_assert_ne!(&backup, &primary);
                    if disjoint_exists {
                        prop_assert!(backup.iter().all(|l| !used.contains(&cands[l.candidate].peer)));
                    }
                }
            }
        }
    }
}
