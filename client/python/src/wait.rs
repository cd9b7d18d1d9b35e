//! Waiting for work with the interpreter released, interruptibly: the work
//! runs elsewhere (its own thread, or a task on the mesh's runtime), and the
//! waiting thread wakes every [`TICK`] to let Python handle signals, so
//! Ctrl-C ends the wait.

use std::{
    sync::mpsc::{RecvTimeoutError, sync_channel},
    time::Duration,
};

use pyo3::prelude::*;

use crate::error::RunError;

/// How often a wait gives Python a chance to raise `KeyboardInterrupt`.
const TICK: Duration = Duration::from_millis(100);

/// Runs `work` on a thread of its own and waits for its result.
///
/// On Ctrl-C the wait ends with `KeyboardInterrupt`; the thread finishes its
/// work (a forward pass cannot be cancelled halfway) and its result is
/// dropped.
///
/// # Errors
/// `KeyboardInterrupt`, or a [`RunError`] when the thread panicked.
pub(crate) fn on_thread<T: Send + 'static>(
    py: Python<'_>,
    work: impl FnOnce() -> T + Send + 'static,
) -> PyResult<T> {
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("nnmesh-run".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| RunError::new_err(format!("cannot start a thread: {e}")))?;
    let mut rx = rx;
    loop {
        // A receiver cannot be shared with the detached closure, only moved
        // in and out of it.
        let (back, got) = py.detach(move || {
            let got = rx.recv_timeout(TICK);
            (rx, got)
        });
        rx = back;
        match got {
            Ok(v) => return Ok(v),
            Err(RecvTimeoutError::Timeout) => py.check_signals()?,
            Err(RecvTimeoutError::Disconnected) => {
                return Err(RunError::new_err(
                    "the run ended without an answer (its thread panicked)",
                ));
            }
        }
    }
}

/// Runs `fut` on `rt` and waits for its output; Ctrl-C aborts the task.
///
/// # Errors
/// `KeyboardInterrupt`, or a [`RunError`] when the task panicked.
pub(crate) fn on_runtime<T: Send + 'static>(
    py: Python<'_>,
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> PyResult<T> {
    let mut task = rt.spawn(fut);
    loop {
        // The timer must be made inside the runtime.
        let done = py.detach(|| rt.block_on(async { tokio::time::timeout(TICK, &mut task).await }));
        match done {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => return Err(RunError::new_err(format!("the mesh task failed: {e}"))),
            Err(_elapsed) => {
                if let Err(e) = py.check_signals() {
                    task.abort();
                    return Err(e);
                }
            }
        }
    }
}
