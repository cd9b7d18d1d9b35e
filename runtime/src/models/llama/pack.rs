//! Several requests in one forward: each keeps its own rows, positions,
//! attention mask, KV cache and hooks, and the dense layers (norms,
//! projections, MLP, head) run once over all their rows.
//!
//! A [`Rows`] holds the value at one point of the forward as one tensor per
//! segment (a request's `[b, t, d]`). Hooks only ever see their own
//! segment's tensor, so an intervention cannot address another request's
//! rows. A dense op concatenates the live segments into one `[rows, d]`
//! matrix (once; it is kept while no hook replaces a part), runs, and hands
//! each segment a view of its rows back. Attention runs per segment, over
//! its own cache and mask: the only op that mixes rows of a sequence never
//! sees another request's.
//!
//! A segment that fails — its hook returns an error or panics, or replaces a
//! value with one of another shape, or stops — leaves the forward there with
//! its error; the others run on. With one segment no concatenation happens,
//! and the forward is the plain one.

use std::panic::AssertUnwindSafe;

use nnmesh_graph::{Module, Point};
use tch::Tensor;

use super::{Cache, Mask};
use crate::{
    error::{HookError, panic_message},
    hooks::{Hooks, at},
};

/// One segment's state during a packed forward.
pub(super) struct Live<'a> {
    pub(super) hooks: &'a mut dyn Hooks,
    pub(super) cache: Option<&'a mut Cache>,
    /// RoPE cos and sin for its positions, and its attention mask.
    pub(super) rope: Option<(Tensor, Tensor, Mask)>,
    /// Why it left the forward (a stop, or a failure), if it did.
    pub(super) failed: Option<HookError>,
}

impl Live<'_> {
    pub(super) fn alive(&self) -> bool {
        self.failed.is_none()
    }

    /// Runs `f` for this segment alone: an error or a panic ends the
    /// segment (and only it).
    pub(super) fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, HookError>,
    ) -> Option<T> {
        if self.failed.is_some() {
            return None;
        }
        match std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut *self))) {
            Ok(Ok(t)) => Some(t),
            Ok(Err(e)) => {
                self.failed = Some(e);
                None
            }
            Err(payload) => {
                self.failed = Some(HookError::Panic(panic_message(payload.as_ref())));
                None
            }
        }
    }
}

/// The value at one point of a packed forward: each segment's tensor
/// (`None` once the segment left), and, when known, all live rows as one
/// `[rows, d]` matrix.
pub(super) struct Rows {
    parts: Vec<Option<Tensor>>,
    flat: Option<Tensor>,
}

impl Rows {
    pub(super) fn new(parts: Vec<Option<Tensor>>) -> Rows {
        Rows { parts, flat: None }
    }

    fn empty(n: usize) -> Rows {
        Rows::new((0..n).map(|_| None).collect())
    }

    pub(super) fn part(&self, i: usize) -> Option<&Tensor> {
        self.parts[i].as_ref()
    }

    pub(super) fn part_mut(&mut self, i: usize) -> Option<&mut Tensor> {
        self.flat = None;
        self.parts[i].as_mut()
    }

    pub(super) fn into_parts(self) -> Vec<Option<Tensor>> {
        self.parts
    }

    /// Another handle on the same values: hooks on it replace its parts,
    /// not these.
    pub(super) fn shallow(&self) -> Rows {
        Rows {
            parts: self
                .parts
                .iter()
                .map(|p| p.as_ref().map(Tensor::shallow_clone))
                .collect(),
            flat: self.flat.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// Drops the parts of segments that left the forward.
    fn sync(&mut self, lives: &[Live]) {
        for (part, live) in self.parts.iter_mut().zip(lives) {
            if part.is_some() && !live.alive() {
                *part = None;
                self.flat = None;
            }
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.parts.len())
            .filter(|&i| self.parts[i].is_some())
            .collect()
    }

    /// Calls each live segment's hooks at `(module, point)` on its own part.
    pub(super) fn hook(&mut self, lives: &mut [Live], module: Module, point: Point) {
        self.sync(lives);
        for (i, live) in lives.iter_mut().enumerate() {
            let Some(part) = self.parts[i].as_mut() else {
                continue;
            };
            if !live.hooks.wants(module, point) {
                continue;
            }
            let before = (part.data_ptr(), part.stride());
            if live
                .guard(|l| at(&mut *l.hooks, module, point, part))
                .is_none()
            {
                self.parts[i] = None;
                self.flat = None;
            } else if (part.data_ptr(), part.stride()) != before {
                self.flat = None;
            }
        }
    }

    /// The live parts as one `[rows, d]` matrix.
    fn flat(&mut self) -> Tensor {
        if let Some(f) = &self.flat {
            return f.shallow_clone();
        }
        let rows: Vec<Tensor> = self
            .parts
            .iter()
            .flatten()
            .map(|p| p.reshape([-1, *p.size().last().expect("a part has dimensions")]))
            .collect();
        let flat = Tensor::cat(&rows, 0);
        self.flat = Some(flat.shallow_clone());
        flat
    }

    /// Splits `y` (`[rows, d']`, rows as in [`Rows::flat`]) back into parts
    /// shaped as `self`'s but for the last dimension.
    fn split_like(&self, y: Tensor) -> Rows {
        let d = *y.size().last().expect("a matrix");
        let mut off = 0;
        let parts = self
            .parts
            .iter()
            .map(|p| {
                let p = p.as_ref()?;
                let mut shape = p.size();
                let last = shape.pop().expect("a part has dimensions");
                let n = p.numel() as i64 / last.max(1);
                shape.push(d);
                let part = y.narrow(0, off, n).view(shape.as_slice());
                off += n;
                Some(part)
            })
            .collect();
        Rows {
            parts,
            flat: Some(y),
        }
    }

    /// A row-wise op (each row's result depends on that row only) over all
    /// live rows at once. Should the op itself fail, every segment in it
    /// fails.
    pub(super) fn map(&mut self, lives: &mut [Live], f: impl Fn(&Tensor) -> Tensor) -> Rows {
        self.zip_with(None, lives, |a, _| f(a))
    }

    /// As [`Rows::map`] for a row-wise op of two values (a residual add).
    pub(super) fn zip(
        &mut self,
        other: &mut Rows,
        lives: &mut [Live],
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
    ) -> Rows {
        self.zip_with(Some(other), lives, |a, b| f(a, b.expect("two operands")))
    }

    fn zip_with(
        &mut self,
        mut other: Option<&mut Rows>,
        lives: &mut [Live],
        f: impl Fn(&Tensor, Option<&Tensor>) -> Tensor,
    ) -> Rows {
        self.sync(lives);
        if let Some(o) = other.as_deref_mut() {
            o.sync(lives);
            // A part missing from either leaves both.
            for i in 0..self.parts.len() {
                if self.parts[i].is_some() != o.parts[i].is_some() {
                    self.parts[i] = None;
                    o.parts[i] = None;
                    self.flat = None;
                    o.flat = None;
                }
            }
        }
        let live = self.live();
        let run = |a: &Tensor, b: Option<&Tensor>| {
            std::panic::catch_unwind(AssertUnwindSafe(|| f(a, b)))
                .map_err(|p| panic_message(p.as_ref()))
        };
        let out = match live.as_slice() {
            [] => return Rows::empty(self.parts.len()),
            // One segment: the plain forward, on its own shape.
            &[i] => run(
                self.parts[i].as_ref().expect("live"),
                other.as_ref().and_then(|o| o.parts[i].as_ref()),
            )
            .map(|y| {
                let mut rows = Rows::empty(self.parts.len());
                rows.parts[i] = Some(y);
                rows
            }),
            _ => {
                let a = self.flat();
                let b = other.map(Rows::flat);
                run(&a, b.as_ref()).map(|y| self.split_like(y))
            }
        };
        out.unwrap_or_else(|msg| {
            for &i in &live {
                lives[i].failed = Some(HookError::Panic(format!(
                    "a batched op of {} requests failed: {msg}",
                    live.len()
                )));
            }
            Rows::empty(self.parts.len())
        })
    }
}
