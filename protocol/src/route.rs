//! Route search: the cheapest chain of stages covering every layer.
//!
//! Pure and deterministic: a client picks the same route from the same
//! records every time, and anything else that routes (a simulator, a
//! replacement search) can share it.
//!
//! # Cost model
//!
//! The layer boundaries `0..=num_layers` are the vertices of a graph; a
//! [`Candidate`] serving layers `[start, end)` is an edge `start → end` that
//! costs the time, in milliseconds, to push one token through it:
//!
//! ```text
//! cost = rtt_ms + (end - start) * 1000 / max(throughput, 1e-3) * (1 + load)
//! ```
//!
//! - `rtt_ms`: network round trip to the peer (one hand-off per hop);
//! - `(end - start) * 1000 / throughput`: compute time of the span, reading
//!   `throughput` as tokens per second per layer, so a longer span costs
//!   proportionally more;
//! - `(1 + load)`: queueing, with `load` the peer's queue fullness in 0..1.
//!
//! A route is a shortest path from boundary 0 to `num_layers` (Dijkstra;
//! costs are non-negative). Candidates with an empty or out-of-range span or
//! a non-finite cost (e.g. a NaN input) are ignored; negative `rtt_ms` and `load` count as 0.
//! Ties are broken by the peer id (then the candidate index) of the last
//! hop into each boundary, so the result does not depend on hash order or
//! floating-point noise in the inputs' order.

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
};

use crate::{PeerId, span::Span};

/// A peer serving a contiguous layer span, as seen by the router.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The peer.
    pub peer: PeerId,
    /// The layers it serves.
    pub span: Span,
    /// Measured throughput, tokens per second.
    pub throughput: f32,
    /// Round-trip time to the peer, milliseconds.
    pub rtt_ms: f32,
    /// Queue fullness, 0..1.
    pub load: f32,
}

impl Candidate {
    /// The edge cost of this candidate (see the [module docs](self));
    /// infinite if any input is NaN.
    pub fn cost(&self) -> f32 {
        if self.rtt_ms.is_nan() || self.throughput.is_nan() || self.load.is_nan() {
            return f32::INFINITY;
        }
        let layers = self.span.len() as f32;
        self.rtt_ms.max(0.0)
            + layers * 1000.0 / self.throughput.max(1e-3) * (1.0 + self.load.max(0.0))
    }
}

/// Distance label: (edges on penalized peers, summed cost). Compared
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

/// Dijkstra over layer boundaries. `penalized(i)` marks candidates whose use
/// is minimized first; `usable(i)` filters candidates out entirely.
fn shortest(
    cands: &[Candidate],
    num_layers: u32,
    usable: impl Fn(usize) -> bool,
    penalized: impl Fn(usize) -> bool,
) -> Option<Vec<usize>> {
    let n = num_layers as usize;
    // Outgoing edges per boundary.
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
    for (i, c) in cands.iter().enumerate() {
        if !c.span.is_empty() && c.span.end <= num_layers && c.cost().is_finite() && usable(i) {
            out[c.span.start as usize].push(i);
        }
    }
    let mut dist: Vec<Option<Dist>> = vec![None; n + 1];
    let mut pred: Vec<Option<usize>> = vec![None; n + 1];
    let mut done = vec![false; n + 1];
    let mut heap = BinaryHeap::new();
    dist[0] = Some(Dist {
        penalty: 0,
        cost: 0.0,
    });
    heap.push(Reverse(Entry {
        dist: Dist {
            penalty: 0,
            cost: 0.0,
        },
        boundary: 0,
    }));
    while let Some(Reverse(Entry { dist: d, boundary })) = heap.pop() {
        let u = boundary as usize;
        if done[u] {
            continue;
        }
        done[u] = true;
        if u == n {
            break;
        }
        for &i in &out[u] {
            let c = &cands[i];
            let v = c.span.end as usize;
            let nd = Dist {
                penalty: d.penalty + u32::from(penalized(i)),
                cost: d.cost + f64::from(c.cost()),
            };
            let better = match dist[v] {
                None => true,
                Some(old) => match nd.cmp(&old) {
                    Ordering::Less => true,
                    Ordering::Greater => false,
                    Ordering::Equal => {
                        let p = pred[v].expect("a labelled boundary has a predecessor");
                        (&c.peer, i) < (&cands[p].peer, p)
                    }
                },
            };
            if better && !done[v] {
                dist[v] = Some(nd);
                pred[v] = Some(i);
                heap.push(Reverse(Entry {
                    dist: nd,
                    boundary: c.span.end,
                }));
            }
        }
    }
    dist[n]?;
    let mut route = Vec::new();
    let mut at = n;
    while at != 0 {
        let i = pred[at].expect("a reached boundary has a predecessor");
        route.push(i);
        at = cands[i].span.start as usize;
    }
    route.reverse();
    Some(route)
}

/// Finds the cheapest route covering layers `0..num_layers`, as indices into
/// `cands` in layer order, using no peer listed in `exclude`.
///
/// Returns `None` if the usable candidates leave a gap, and `Some(vec![])`
/// for `num_layers == 0`.
pub fn find_route(cands: &[Candidate], num_layers: u32, exclude: &[PeerId]) -> Option<Vec<usize>> {
    shortest(
        cands,
        num_layers,
        |i| !exclude.contains(&cands[i].peer),
        |_| false,
    )
}

/// Finds a fail-over route for `primary` (indices into `cands`): the cheapest
/// route that uses no peer of `primary`; where no such route exists, the
/// cheapest among those using the fewest hops on `primary`'s peers.
///
/// Returns `None` if no route exists or the only one found is `primary`
/// itself (so there is nothing to keep warm).
pub fn disjoint_backup(
    cands: &[Candidate],
    num_layers: u32,
    primary: &[usize],
    exclude: &[PeerId],
) -> Option<Vec<usize>> {
    let used: Vec<&PeerId> = primary
        .iter()
        .filter_map(|&i| cands.get(i).map(|c| &c.peer))
        .collect();
    let backup = shortest(
        cands,
        num_layers,
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

    fn route_cost(cands: &[Candidate], route: &[usize]) -> f64 {
        route.iter().map(|&i| f64::from(cands[i].cost())).sum()
    }

    fn covers(cands: &[Candidate], route: &[usize], num_layers: u32) -> bool {
        let mut at = 0;
        for &i in route {
            if cands[i].span.start != at || cands[i].span.end <= at {
                return false;
            }
            at = cands[i].span.end;
        }
        at == num_layers
    }

    #[test]
    fn prefers_one_fast_hop_over_two() {
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(3, 0, 30, 1000.0),
        ];
        assert_eq!(find_route(&cands, 30, &[]), Some(vec![2]));
        assert_eq!(find_route(&cands, 30, &[peer(3)]), Some(vec![0, 1]));
    }

    #[test]
    fn gap_means_no_route() {
        let cands = vec![cand(1, 0, 10, 100.0), cand(2, 11, 30, 100.0)];
        assert_eq!(find_route(&cands, 30, &[]), None);
        assert_eq!(find_route(&[], 0, &[]), Some(vec![]));
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
        assert_eq!(find_route(&cands, 30, &[]), Some(vec![3]));
    }

    #[test]
    fn ties_break_by_peer_id() {
        let a = vec![
            cand(7, 0, 30, 100.0),
            cand(3, 0, 30, 100.0),
            cand(5, 0, 30, 100.0),
        ];
        let least = (0..3).min_by_key(|&i| a[i].peer).expect("three");
        assert_eq!(find_route(&a, 30, &[]), Some(vec![least]));
        let mut b = a.clone();
        b.reverse();
        assert_eq!(find_route(&b, 30, &[]), Some(vec![2 - least]));
    }

    #[test]
    fn backup_avoids_primary_peers() {
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(3, 0, 15, 50.0),
            cand(4, 15, 30, 50.0),
        ];
        let primary = find_route(&cands, 30, &[]).unwrap();
        assert_eq!(primary, vec![0, 1]);
        assert_eq!(disjoint_backup(&cands, 30, &primary, &[]), Some(vec![2, 3]));
    }

    #[test]
    fn backup_shares_as_little_as_possible() {
        // Only peer 1 serves 0..15: the backup must reuse it, but not peer 2.
        let cands = vec![
            cand(1, 0, 15, 100.0),
            cand(2, 15, 30, 100.0),
            cand(4, 15, 30, 10.0),
        ];
        let primary = find_route(&cands, 30, &[]).unwrap();
        assert_eq!(disjoint_backup(&cands, 30, &primary, &[]), Some(vec![0, 2]));
        // A single route: nothing to fall back to.
        let single = vec![cand(1, 0, 30, 100.0)];
        assert_eq!(disjoint_backup(&single, 30, &[0], &[]), None);
    }

    /// All routes covering 0..num_layers, by depth-first enumeration.
    fn all_routes(
        cands: &[Candidate],
        num_layers: u32,
        at: u32,
        path: &mut Vec<usize>,
        out: &mut Vec<Vec<usize>>,
    ) {
        if at == num_layers {
            out.push(path.clone());
            return;
        }
        for (i, c) in cands.iter().enumerate() {
            if c.span.start == at && c.span.end > at && c.span.end <= num_layers {
                path.push(i);
                all_routes(cands, num_layers, c.span.end, path, out);
                path.pop();
            }
        }
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
        ) {
            let exclude: Vec<PeerId> = excluded.map(peer).into_iter().collect();
            let mut routes = Vec::new();
            all_routes(&cands, num_layers, 0, &mut Vec::new(), &mut routes);
            routes.retain(|r| r.iter().all(|&i| !exclude.contains(&cands[i].peer)));
            let best = routes
                .iter()
                .map(|r| route_cost(&cands, r))
                .min_by(f64::total_cmp);
            match find_route(&cands, num_layers, &exclude) {
                None => prop_assert!(best.is_none()),
                Some(route) => {
                    prop_assert!(covers(&cands, &route, num_layers));
                    prop_assert!(route.iter().all(|&i| !exclude.contains(&cands[i].peer)));
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
            let Some(primary) = find_route(&cands, num_layers, &[]) else {
                return Ok(());
            };
            let used: Vec<PeerId> = primary.iter().map(|&i| cands[i].peer).collect();
            let disjoint_exists = find_route(&cands, num_layers, &used).is_some();
            match disjoint_backup(&cands, num_layers, &primary, &[]) {
                // If a fully disjoint route exists, the backup is one.
                None => prop_assert!(!disjoint_exists),
                Some(backup) => {
                    prop_assert!(covers(&cands, &backup, num_layers));
                    prop_assert_ne!(&backup, &primary);
                    if disjoint_exists {
                        prop_assert!(backup.iter().all(|&i| !used.contains(&cands[i].peer)));
                    }
                }
            }
        }
    }
}
