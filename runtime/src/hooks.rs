//! Hook points: how a caller observes and replaces values during a forward.
//!
//! The model calls [`Hooks::wants`] at every hook point (a cheap lookup, a
//! bitset in the interpreter) and [`Hooks::visit`] only where it answers yes,
//! so an empty hook set costs nothing but a few branches per layer. Points that
//! cost extra work to produce (the attention `pattern`) are only materialized
//! when wanted.

use nnmesh_graph::{Module, Point};
use tch::Tensor;

pub use crate::error::HookError;

/// A set of hooks on a forward pass.
pub trait Hooks {
    /// Called before each forward of a generation: `step` 0 is the prompt,
    /// step `s` feeds the token chosen at step `s - 1`.
    fn begin_step(&mut self, _step: usize) {}

    /// Called before each decoder layer: rows to append to the batch, as
    /// copies of these existing rows (invokes that shared a row with an
    /// identical prompt and are written from this layer on).
    fn fork_rows(&mut self, _layer: u32) -> Option<Vec<i64>> {
        None
    }

    /// Whether anything is hooked at `(module, point)`.
    fn wants(&self, module: Module, point: Point) -> bool;

    /// Observes, and may replace, the value at a hook point.
    ///
    /// # Errors
    /// [`HookError::Stop`] ends the forward; any other error aborts it.
    fn visit(&mut self, module: Module, point: Point, value: &mut Tensor) -> Result<(), HookError>;
}

/// No hooks: a plain forward.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn wants(&self, _: Module, _: Point) -> bool {
        false
    }
    fn visit(&mut self, _: Module, _: Point, _: &mut Tensor) -> Result<(), HookError> {
        Ok(())
    }
}

/// Calls `visit` if the point is hooked. A hook may replace the value, but
/// only with one of the same shape and dtype: the forward goes on with it
/// (and, in a packed forward, beside other requests' rows).
pub(crate) fn at(
    hooks: &mut dyn Hooks,
    module: Module,
    point: Point,
    value: &mut Tensor,
) -> Result<(), HookError> {
    if !hooks.wants(module, point) {
        return Ok(());
    }
    let (size, kind) = (value.size(), value.kind());
    hooks.visit(module, point, value)?;
    if value.size() != size || value.kind() != kind {
        return Err(HookError::Replaced {
            at: format!("{}.{}", module.path(), point.name()),
            want: format!("{kind:?} {size:?}"),
            got: format!("{:?} {:?}", value.kind(), value.size()),
        });
    }
    Ok(())
}
