//! Row sharing: invokes with identical prompts compute identical values until
//! the first write aimed at one of them, so they share one batch row until
//! the layer of that write, where their row forks (a copy of the shared
//! residual stream enters that layer as a new row).
//!
//! Activation patching is the case this is for: 30 patched copies of the
//! corrupted prompt plus the corrupted run itself would cost 31 rows through
//! every layer; with sharing, the copy patched at layer `l` only runs layers
//! `l..`, which halves the work of a 30-layer sweep.
//!
//! Sharing is planned only where it is exact and cheap to get right: a trace
//! of one forward (no generation, so no KV cache to fork), prompts of equal
//! length (no padding: every row has the same positions and causal mask),
//! hooks that all name one invoke (a whole-batch hook would see the physical
//! layout), and writes inside decoder layers.

use std::collections::HashMap;

use nnmesh_graph::{Graph, Manifest, Node, Prompt};

/// How one trace's invokes map onto batch rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharing {
    /// The invoke each physical row carries when the forward starts.
    pub initial: Vec<usize>,
    /// `(layer, invoke, source)`: before `layer`, `invoke` gets its own row,
    /// a copy of `source`'s; in layer, then invoke order.
    pub forks: Vec<(u32, usize, usize)>,
    /// Each invoke's group representative (the member that keeps the shared row).
    pub rep_of: Vec<usize>,
}

impl Sharing {
    /// Plans sharing for `trace`, or `None` when it does not apply or gains nothing.
    pub fn plan(graph: &Graph, manifest: &Manifest, trace: usize) -> Option<Sharing> {
        let t = graph.traces.get(trace)?;
        if t.max_new_tokens > 0 || t.invokes.len() < 2 {
            return None;
        }
        let prompts: Vec<&Vec<u32>> = t
            .invokes
            .iter()
            .map(|i| match &i.prompt {
                Prompt::Tokens(ids) => Some(ids),
                Prompt::Text(_) => None,
            })
            .collect::<Option<_>>()?;
        if prompts.iter().any(|p| p.len() != prompts[0].len()) {
            return None;
        }
        // The first layer each invoke is written in (u32::MAX: never).
        let mut fork_layer = vec![u32::MAX; prompts.len()];
        for node in &graph.nodes {
            let (hook, is_write) = match node {
                Node::Read { hook } => (hook, false),
                Node::Write { hook, .. } => (hook, true),
                _ => continue,
            };
            if hook.trace as usize != trace {
                continue;
            }
            let invoke = hook.invoke? as usize;
            if is_write {
                let layer = manifest.parse_module(&hook.module)?.layer()?;
                let slot = fork_layer.get_mut(invoke)?;
                *slot = (*slot).min(layer);
            }
        }
        // Group identical prompts, in order of first appearance.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut index: HashMap<&Vec<u32>, usize> = HashMap::new();
        for (i, p) in prompts.iter().enumerate() {
            let g = *index.entry(p).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        if groups.len() == prompts.len() {
            return None;
        }
        let mut initial = Vec::new();
        let mut forks = Vec::new();
        let mut rep_of = vec![0; prompts.len()];
        for members in &groups {
            // The member written last keeps the shared row; the others fork
            // from it no later than its own first write.
            let rep = *members
                .iter()
                .max_by_key(|&&i| (fork_layer[i], std::cmp::Reverse(i)))
                .expect("groups are not empty");
            initial.push(rep);
            for &i in members {
                rep_of[i] = rep;
                if i != rep && fork_layer[i] != u32::MAX {
                    forks.push((fork_layer[i], i, rep));
                }
            }
        }
        forks.sort();
        Some(Sharing {
            initial,
            forks,
            rep_of,
        })
    }

    /// The physical row of every invoke before decoder layer `layer` runs,
    /// and the number of physical rows then.
    pub fn rows_before(&self, layer: u32) -> (Vec<usize>, usize) {
        let mut row_of = vec![usize::MAX; self.rep_of.len()];
        for (r, &i) in self.initial.iter().enumerate() {
            row_of[i] = r;
        }
        let mut rows = self.initial.len();
        for &(_, i, _) in self.forks.iter().filter(|f| f.0 < layer) {
            row_of[i] = rows;
            rows += 1;
        }
        // Invokes that have not forked (yet, or ever) ride on their group's row.
        for i in 0..row_of.len() {
            if row_of[i] == usize::MAX {
                row_of[i] = row_of[self.rep_of[i]];
            }
        }
        (row_of, rows)
    }

    /// The forks that happen right before `layer`: `(invoke, source)`.
    pub fn forks_at(&self, layer: u32) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.forks
            .iter()
            .filter(move |f| f.0 == layer)
            .map(|&(_, i, src)| (i, src))
    }
}

#[cfg(test)]
mod tests {
    use nnmesh_graph::{Builder, DType, IndexItem::*, Point};

    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            model: "tiny".into(),
            num_layers: 4,
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            intermediate: 16,
            vocab: 32,
            max_positions: 64,
            dtype: DType::F32,
        }
    }

    #[test]
    fn patching_forks_each_copy_at_its_layer() {
        let g = Builder::new();
        let (clean, corrupt) = (vec![1, 2, 3], vec![1, 2, 4]);
        let t = g.trace_tokens(vec![
            clean,
            corrupt.clone(),
            corrupt.clone(),
            corrupt.clone(),
        ]);
        for (k, layer) in [(2u32, 3u32), (3, 1)] {
            let m = format!("model.layers.{layer}");
            let c = g
                .read(t.invoke(0).at(&m, Point::Output))
                .index([Full, At(-1), Full]);
            g.write_at(t.invoke(k).at(&m, Point::Output), [Full, At(-1), Full], c);
        }
        let s = Sharing::plan(&g.finish(), &manifest(), 0).expect("sharing applies");
        assert_eq!(s.initial, [0, 1]);
        assert_eq!(s.forks, [(1, 3, 1), (3, 2, 1)]);
        assert_eq!(s.rows_before(0), (vec![0, 1, 1, 1], 2));
        assert_eq!(s.rows_before(2), (vec![0, 1, 1, 2], 3));
        assert_eq!(s.rows_before(4), (vec![0, 1, 3, 2], 4));
    }

    #[test]
    fn whole_batch_hooks_generation_and_padding_disable_sharing() {
        let m = manifest();
        let g = Builder::new();
        let t = g.trace_tokens(vec![vec![1, 2], vec![1, 2]]);
        g.save("h", g.read(t.at("model.layers.1", Point::Output)));
        assert_eq!(Sharing::plan(&g.finish(), &m, 0), None);
        let g = Builder::new();
        g.trace_tokens(vec![vec![1, 2], vec![1, 2]]).generate(2);
        assert_eq!(Sharing::plan(&g.finish(), &m, 0), None);
        let g = Builder::new();
        g.trace_tokens(vec![vec![1, 2], vec![1]]);
        assert_eq!(Sharing::plan(&g.finish(), &m, 0), None);
        let g = Builder::new();
        g.trace_tokens(vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(Sharing::plan(&g.finish(), &m, 0), None, "nothing to share");
    }
}
