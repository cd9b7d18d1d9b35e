//! Choosing a route: which model is fully served, and the cheapest chain of
//! holders through it (the control crate's [`find_route`] search over RTT,
//! compute and load, using any part of a holder's span), plus the coverage
//! figures `nnmesh status` prints.

use std::collections::BTreeMap;

use nnmesh_control::{
    placement::{Holder, uncovered},
    route::{Candidate, find_route},
};
use nnmesh_protocol::{Span, ids::ModelId};

use super::{Error, Peer};

/// The router's view of a peer.
pub fn candidate(p: &Peer) -> Candidate {
    Candidate {
        peer: p.peer,
        span: p.record.span,
        // Records give tokens/s through the whole span; the router prices
        // each layer at 1/throughput-per-layer.
        throughput: p.record.throughput * p.record.span.len() as f32,
        rtt_ms: p.rtt_ms,
        load: p.record.load,
    }
}

/// A route: each peer with the layers it runs for the request (part or all
/// of what it serves), in layer order.
pub type Route<'a> = Vec<(&'a Peer, Span)>;

/// Picks the model (the one fully served, unless given) and the cheapest
/// route through the nodes serving it: each peer with the layers it runs
/// (part or all of what it serves).
///
/// # Errors
/// When no model, or more than one, is fully served.
pub fn choose_route(peers: &[Peer], model: Option<ModelId>) -> Result<(ModelId, Route<'_>), Error> {
    let mut by_model: BTreeMap<[u8; 32], Vec<&Peer>> = BTreeMap::new();
    for p in peers {
        by_model.entry(p.record.model.0).or_default().push(p);
    }
    let mut routes = Vec::new();
    let mut gaps = Vec::new();
    for (id, ps) in &by_model {
        let id = ModelId(*id);
        if model.is_some_and(|m| m != id) {
            continue;
        }
        let n = ps[0].record.num_layers;
        let cands: Vec<Candidate> = ps.iter().map(|p| candidate(p)).collect();
        match find_route(&cands, Span::new(0, n), &[]) {
            Some(legs) => routes.push((
                id,
                legs.into_iter()
                    .map(|l| (ps[l.candidate], l.span))
                    .collect::<Vec<_>>(),
            )),
            None => gaps.push(format!(
                "{} ({}): {}",
                ps[0].record.model_name,
                id,
                coverage_gaps(ps, n)
            )),
        }
    }
    match routes.len() {
        1 => Ok(routes.remove(0)),
        0 => Err(Error::Coverage(if gaps.is_empty() {
            "no node serves the requested model".into()
        } else {
            gaps.join("; ")
        })),
        _ => Err(Error::Ambiguous(
            routes
                .iter()
                .map(|(id, _)| id.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// A peer as the placement rules see it.
pub fn holder(p: &Peer) -> Holder {
    Holder {
        peer: p.peer,
        span: p.record.span,
        throughput: p.record.throughput,
    }
}

/// The layers no peer serves, for errors: "layers 10..20 unserved, …".
pub fn coverage_gaps(peers: &[&Peer], num_layers: u32) -> String {
    let holders: Vec<Holder> = peers.iter().map(|p| holder(p)).collect();
    let gaps: Vec<String> = uncovered(&holders, num_layers)
        .iter()
        .map(|s| format!("layers {s} unserved"))
        .collect();
    if gaps.is_empty() {
        "no contiguous route".into()
    } else {
        gaps.join(", ")
    }
}
