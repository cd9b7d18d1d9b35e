//! The discovery layer's costs: Kademlia lookups measured on the mesh's
//! current membership, and (in `blocks` mode) the per-block record store.
//!
//! # Lookups
//!
//! [`Kad`] keeps the live nodes' 64-bit keys sorted. A node's routing
//! table is implicit: its bucket `i` is the key range at XOR distance
//! `[2^i, 2^(i+1))`, a contiguous range of the sorted keys, of which the
//! node knows at most `k` (a window chosen by a hash of its key). An
//! iterative lookup (α queries in flight, stop when the `k` closest seen
//! have all answered) runs over these tables exactly as Kademlia's does, so
//! the messages and rounds per lookup come out of the membership, not out
//! of a formula. A few dozen lookups are measured every few minutes, and
//! each lookup of the run is charged their mean (storage is O(n); no
//! per-node tables).
//!
//! # Records
//!
//! [`Records`] holds, per block, the records of the nodes that announced
//! it: span, throughput, load, expiry. Records are refreshed by their
//! nodes and expire on their own, so a dead node's records linger until
//! they expire, as in Petals. Per-block aggregates are kept exactly
//! (integer throughput in milli-tokens/s), so a census costs O(blocks).

use nnmesh_control::placement::Census;
use nnmesh_protocol::Span;

use crate::{
    engine::Time,
    rng::{Rng, mix},
};

/// Kademlia over the live nodes' keys.
#[derive(Debug)]
pub(crate) struct Kad {
    /// Sorted keys and their nodes.
    keys: Vec<u64>,
    nodes: Vec<u32>,
    k: usize,
    alpha: usize,
    /// Mean RPCs per lookup, measured (a full lookup: until the `k`
    /// closest have answered, as a store or a provider query needs).
    pub(crate) rpcs_per_lookup: f64,
    /// Mean rounds per lookup, measured.
    pub(crate) rounds_per_lookup: f64,
    /// Mean RPCs of a read that stops at the first storer's answer.
    pub(crate) rpcs_per_get: f64,
    /// Mean rounds of such a read.
    pub(crate) rounds_per_get: f64,
}

impl Kad {
    pub(crate) fn new(k: u32, alpha: u32) -> Kad {
        Kad {
            keys: Vec::new(),
            nodes: Vec::new(),
            k: k.max(1) as usize,
            alpha: alpha.max(1) as usize,
            rpcs_per_lookup: 0.0,
            rounds_per_lookup: 0.0,
            rpcs_per_get: 0.0,
            rounds_per_get: 0.0,
        }
    }

    /// Members.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Replaces the membership.
    pub(crate) fn rebuild(&mut self, mut members: Vec<(u64, u32)>) {
        members.sort_unstable();
        members.dedup_by_key(|m| m.0);
        self.keys = members.iter().map(|m| m.0).collect();
        self.nodes = members.iter().map(|m| m.1).collect();
    }

    /// Measures `samples` lookups of random keys from random members, both
    /// full ones and reads that stop at the first storer.
    pub(crate) fn measure(&mut self, rng: &mut Rng, samples: u32) {
        if self.keys.len() < 2 || samples == 0 {
            let one = if self.keys.is_empty() { 0.0 } else { 1.0 };
            self.rpcs_per_lookup = one;
            self.rounds_per_lookup = one;
            self.rpcs_per_get = one;
            self.rounds_per_get = one;
            return;
        }
        let (mut rpcs, mut rounds, mut get_rpcs, mut get_rounds) = (0u64, 0u64, 0u64, 0u64);
        for _ in 0..samples {
            let from = self.keys[rng.below(self.keys.len() as u64) as usize];
            let target = rng.next_u64();
            let (r, h) = self.lookup(from, target, None);
            rpcs += r;
            rounds += h;
            let mut closest: Vec<usize> = (0..self.keys.len()).collect();
            closest.sort_unstable_by_key(|&i| self.keys[i] ^ target);
            closest.truncate(self.k);
            let (r, h) = self.lookup(from, target, Some(&closest));
            get_rpcs += r;
            get_rounds += h;
        }
        let n = f64::from(samples);
        self.rpcs_per_lookup = rpcs as f64 / n;
        self.rounds_per_lookup = rounds as f64 / n;
        self.rpcs_per_get = get_rpcs as f64 / n;
        self.rounds_per_get = get_rounds as f64 / n;
    }

    /// An iterative lookup of `target` from the member with key `from`:
    /// (RPCs, rounds). With `storers`, it stops once one of them answers
    /// (a read with a quorum of one); without, once the `k` closest seen
    /// have all answered.
    pub(crate) fn lookup(&self, from: u64, target: u64, storers: Option<&[usize]>) -> (u64, u64) {
        if let Some(me) = self.index_of(from)
            && storers.is_some_and(|s| s.contains(&me))
        {
            return (0, 0);
        }
        let mut short: Vec<(u64, usize, bool)> = self
            .known_closest(from, target)
            .into_iter()
            .filter(|&i| self.keys[i] != from)
            .map(|i| (self.keys[i] ^ target, i, false))
            .collect();
        short.sort_unstable();
        let (mut rpcs, mut rounds) = (0, 0);
        loop {
            let ask: Vec<usize> = short
                .iter()
                .take(self.k)
                .filter(|s| !s.2)
                .take(self.alpha)
                .map(|s| s.1)
                .collect();
            if ask.is_empty() {
                return (rpcs, rounds);
            }
            rounds += 1;
            for &i in &ask {
                rpcs += 1;
                if storers.is_some_and(|s| s.contains(&i)) {
                    return (rpcs, rounds);
                }
                if let Some(s) = short.iter_mut().find(|s| s.1 == i) {
                    s.2 = true;
                }
                for j in self.known_closest(self.keys[i], target) {
                    if self.keys[j] != from && !short.iter().any(|s| s.1 == j) {
                        short.push((self.keys[j] ^ target, j, false));
                    }
                }
            }
            short.sort_unstable();
            short.truncate(self.k * 4);
        }
    }

    /// The `k` members closest to `target` that the member with key `of`
    /// knows (itself included), as indices.
    fn known_closest(&self, of: u64, target: u64) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::with_capacity(self.k * 2);
        let top = 63 - (of ^ target).leading_zeros().min(63);
        // The bucket holding the target first, then the closer buckets and
        // the node itself (all at the same distance class), then the
        // farther ones: the order of distance to the target.
        let mut order: Vec<u32> = vec![top];
        order.extend((0..top).rev());
        order.extend(top + 1..64);
        if let Some(me) = self.index_of(of) {
            out.push(me);
        }
        for i in order {
            self.bucket(of, i, &mut out);
            if out.len() >= self.k * 2 {
                break;
            }
        }
        out.sort_unstable_by_key(|&i| self.keys[i] ^ target);
        out.dedup();
        out.truncate(self.k);
        out
    }

    /// The members of `of`'s bucket `i` that it knows.
    fn bucket(&self, of: u64, i: u32, out: &mut Vec<usize>) {
        let lo = ((of >> i) ^ 1) << i;
        let hi = lo | ((1u64 << i) - 1);
        let a = self.keys.partition_point(|&x| x < lo);
        let b = self.keys.partition_point(|&x| x <= hi);
        let n = b - a;
        if n <= self.k {
            out.extend(a..b);
        } else {
            let start = (mix(of ^ u64::from(i)) % n as u64) as usize;
            out.extend((0..self.k).map(|j| a + (start + j) % n));
        }
    }

    fn index_of(&self, key: u64) -> Option<usize> {
        self.keys.binary_search(&key).ok()
    }

    /// The nodes of the `k` members closest to `target` by XOR: the storers
    /// of a key. (A window of the sorted keys around the target; the XOR
    /// order is taken within it.)
    pub(crate) fn storers(&self, target: u64) -> Vec<u32> {
        let at = self.keys.partition_point(|&x| x < target);
        let w = self.k * 4;
        let (a, b) = (at.saturating_sub(w), (at + w).min(self.keys.len()));
        let mut idx: Vec<usize> = (a..b).collect();
        idx.sort_unstable_by_key(|&i| self.keys[i] ^ target);
        idx.truncate(self.k);
        idx.into_iter().map(|i| self.nodes[i]).collect()
    }
}

/// A record in the per-block store.
#[derive(Debug, Clone)]
pub(crate) struct Rec {
    pub(crate) node: u32,
    pub(crate) span: Span,
    /// Tokens/s through the whole span.
    pub(crate) tp: f32,
    pub(crate) load: f32,
    pub(crate) expires: Time,
    live: bool,
    /// Its position in each block's member list.
    pos: Vec<u32>,
}

/// Throughput in the exact aggregates: milli-tokens/s.
fn milli(tp: f32) -> i64 {
    if tp.is_finite() {
        (f64::from(tp.max(0.0)) * 1000.0).round() as i64
    } else {
        0
    }
}

/// The per-block record store (`blocks` mode).
#[derive(Debug)]
pub(crate) struct Records {
    recs: Vec<Rec>,
    free: Vec<u32>,
    members: Vec<Vec<u32>>,
    holders: Vec<u32>,
    tp_milli: Vec<i64>,
}

impl Records {
    pub(crate) fn new(blocks: u32) -> Records {
        Records {
            recs: Vec::new(),
            free: Vec::new(),
            members: vec![Vec::new(); blocks as usize],
            holders: vec![0; blocks as usize],
            tp_milli: vec![0; blocks as usize],
        }
    }

    fn blocks(&self, span: Span) -> std::ops::Range<usize> {
        let n = self.members.len();
        (span.start as usize).min(n)..(span.end as usize).min(n)
    }

    /// Stores a new record; returns its id.
    pub(crate) fn insert(
        &mut self,
        node: u32,
        span: Span,
        tp: f32,
        load: f32,
        expires: Time,
    ) -> u32 {
        let mut pos = Vec::with_capacity(span.len() as usize);
        let id = self.free.pop().unwrap_or(self.recs.len() as u32);
        for b in self.blocks(span) {
            pos.push(self.members[b].len() as u32);
            self.members[b].push(id);
            self.holders[b] += 1;
            self.tp_milli[b] += milli(tp);
        }
        let rec = Rec {
            node,
            span,
            tp,
            load,
            expires,
            live: true,
            pos,
        };
        if id as usize == self.recs.len() {
            self.recs.push(rec);
        } else {
            self.recs[id as usize] = rec;
        }
        id
    }

    /// A live record.
    pub(crate) fn get(&self, id: u32) -> Option<&Rec> {
        self.recs.get(id as usize).filter(|r| r.live)
    }

    /// Refreshes a live record's load and expiry.
    pub(crate) fn refresh(&mut self, id: u32, load: f32, expires: Time) {
        if let Some(r) = self.recs.get_mut(id as usize).filter(|r| r.live) {
            r.load = load;
            r.expires = expires;
        }
    }

    /// Removes a record (a no-op for one already gone).
    pub(crate) fn remove(&mut self, id: u32) {
        let Some(rec) = self.recs.get_mut(id as usize).filter(|r| r.live) else {
            return;
        };
        rec.live = false;
        let (span, tp, pos) = (rec.span, rec.tp, std::mem::take(&mut rec.pos));
        for (b, &p) in self.blocks(span).zip(&pos) {
            let list = &mut self.members[b];
            let last = list.pop().expect("a member is listed");
            if (p as usize) < list.len() {
                list[p as usize] = last;
                let moved = &mut self.recs[last as usize];
                let off = b - moved.span.start as usize;
                moved.pos[off] = p;
            }
            self.holders[b] -= 1;
            self.tp_milli[b] -= milli(tp);
        }
        self.free.push(id);
    }

    /// The census of every record, less those of `node`.
    pub(crate) fn census_without(&self, mine: &[u32]) -> Census {
        let mut holders = self.holders.clone();
        let mut tp = self.tp_milli.clone();
        for &id in mine {
            if let Some(r) = self.get(id) {
                for b in self.blocks(r.span) {
                    holders[b] -= 1;
                    tp[b] -= milli(r.tp);
                }
            }
        }
        Census {
            holders,
            throughput: tp.iter().map(|&m| m.max(0) as f32 / 1000.0).collect(),
        }
    }

    /// Records holding block `b`.
    pub(crate) fn members(&self, b: usize) -> &[u32] {
        &self.members[b]
    }

    /// Holders per block, as counted.
    pub(crate) fn holders(&self) -> &[u32] {
        &self.holders
    }

    /// Recounts holders per block from the live records (for the
    /// invariant check).
    pub(crate) fn recount(&self) -> (Vec<u32>, Vec<i64>) {
        let n = self.members.len();
        let (mut h, mut t) = (vec![0u32; n], vec![0i64; n]);
        for r in self.recs.iter().filter(|r| r.live) {
            for b in self.blocks(r.span) {
                h[b] += 1;
                t[b] += milli(r.tp);
            }
        }
        (h, t)
    }

    /// The exact throughput aggregates.
    pub(crate) fn tp_milli(&self) -> &[i64] {
        &self.tp_milli
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kad(n: usize, seed: u64) -> Kad {
        let mut rng = Rng::new(seed, 0);
        let mut k = Kad::new(20, 3);
        k.rebuild((0..n).map(|i| (rng.next_u64(), i as u32)).collect());
        k
    }

    #[test]
    fn lookups_grow_with_the_log_of_the_mesh() {
        let mut rng = Rng::new(9, 1);
        let mut costs = Vec::new();
        for n in [100, 1000, 10_000] {
            let mut k = kad(n, n as u64);
            k.measure(&mut rng, 64);
            costs.push(k.rpcs_per_lookup);
        }
        // More nodes, more messages, but far slower than n.
        assert!(costs[0] < costs[1] && costs[1] < costs[2], "{costs:?}");
        assert!(costs[2] < 4.0 * costs[0], "{costs:?}");
        // A read that stops at the first storer costs less than a full lookup.
        let mut k = kad(10_000, 5);
        k.measure(&mut rng, 64);
        assert!(
            k.rpcs_per_get < k.rpcs_per_lookup,
            "{} {}",
            k.rpcs_per_get,
            k.rpcs_per_lookup
        );
    }

    #[test]
    fn a_lookup_reaches_the_closest_member() {
        let k = kad(2000, 3);
        let target = 0x1234_5678_9abc_def0;
        let best = k.keys.iter().map(|&x| x ^ target).min().expect("members");
        // The closest member's own table leads to itself.
        let closest = k.known_closest(k.keys[0], target);
        assert!(!closest.is_empty());
        let storers = k.storers(target);
        assert_eq!(storers.len(), 20);
        let i = k.nodes[k
            .keys
            .iter()
            .position(|&x| x ^ target == best)
            .expect("there")];
        assert!(storers.contains(&i));
    }

    #[test]
    fn records_keep_exact_aggregates() {
        let mut r = Records::new(10);
        let a = r.insert(1, Span::new(0, 5), 100.0, 0.0, Time(10));
        let b = r.insert(2, Span::new(3, 10), 50.5, 0.0, Time(10));
        let c = r.insert(3, Span::new(4, 6), 7.0, 0.0, Time(10));
        assert_eq!(r.holders(), [1, 1, 1, 2, 3, 2, 1, 1, 1, 1]);
        r.remove(b);
        assert_eq!(r.holders(), [1, 1, 1, 1, 2, 1, 0, 0, 0, 0]);
        assert_eq!(r.recount(), (r.holders().to_vec(), r.tp_milli().to_vec()));
        // Lists stay consistent after swap-removes.
        r.remove(a);
        assert_eq!(r.members(4), [c]);
        let census = r.census_without(&[c]);
        assert_eq!(census.holders, vec![0; 10]);
        // Ids are reused.
        assert_eq!(r.insert(4, Span::new(0, 1), 1.0, 0.0, Time(1)), a);
        r.remove(b);
        assert_eq!(r.recount(), (r.holders().to_vec(), r.tp_milli().to_vec()));
    }
}
