//! Running a whole Intervention Graph on one node: tokenize its prompts,
//! validate it, then run each trace (one forward, or greedy generation with a
//! KV cache) under the interpreter, and collect the saved values.

use nnmesh_graph::{Graph, Inputs, Limits, Manifest, Plan, Prompt, ValidateError, validate};
use tch::Tensor;

use crate::{
    engine::{Engine, EngineError, Padded},
    hooks::HookError,
    interpret::{Executor, SavedTensor, Store},
    models::llama::{Batch, Cache, Input, Model, Segment},
};

/// Why a graph could not be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The graph failed validation.
    #[error("invalid graph: {0}")]
    Validate(#[from] ValidateError),
    /// The model could not take the prompts (or tokenize them).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A prompt is still text: tokenize the graph before validating it.
    #[error("prompts must be tokenized before validation")]
    Untokenized,
    /// The forward or a node in it failed.
    #[error("running the graph: {0}")]
    Run(#[from] HookError),
    /// Reading the generated tokens failed.
    #[error("reading the generated tokens: {0}")]
    Tokens(#[from] tch::TchError),
}

/// What a graph run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Saved values, in the order they were saved.
    pub saves: Vec<SavedTensor>,
    /// Per trace, per invoke: the tokens generated (empty for single forwards).
    pub generated: Vec<Vec<Vec<u32>>>,
}

impl Outcome {
    /// The saved value named `name` (the first, for per-step saves).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.saves.iter().find(|s| s.name == name).map(|s| &s.value)
    }
}

/// Replaces text prompts by their token ids.
///
/// # Errors
/// When tokenization fails.
pub fn tokenize_prompts(engine: &Engine, graph: &mut Graph) -> Result<(), EngineError> {
    for trace in &mut graph.traces {
        for inv in &mut trace.invokes {
            if let Prompt::Text(text) = &inv.prompt {
                inv.prompt = Prompt::Tokens(engine.encode(text)?);
            }
        }
    }
    Ok(())
}

/// The token ids of each invoke of a trace (prompts must be tokenized).
pub fn trace_prompts(graph: &Graph, trace: usize) -> Vec<Vec<u32>> {
    graph.traces[trace]
        .invokes
        .iter()
        .map(|i| match &i.prompt {
            Prompt::Tokens(ids) => ids.clone(),
            Prompt::Text(_) => Vec::new(),
        })
        .collect()
}

/// Validates a tokenized graph against a model manifest.
///
/// # Errors
/// The first validation error found.
pub fn plan(graph: &Graph, manifest: &Manifest, limits: &Limits) -> Result<Plan, Error> {
    let inputs = Inputs::from_tokens(graph).ok_or(Error::Untokenized)?;
    Ok(validate(graph, manifest, &inputs, limits)?)
}

/// Tokenizes, validates and runs `graph` on a full model.
///
/// # Errors
/// Invalid graphs, bad prompts, or failures while running.
pub fn run(engine: &Engine, graph: Graph, limits: &Limits) -> Result<Outcome, Error> {
    run_with(engine, graph, limits, true)
}

/// As [`run`], choosing whether invokes with identical prompts share batch
/// rows until they are written (see [`crate::interpret::Sharing`]).
///
/// # Errors
/// Invalid graphs, bad prompts, or failures while running.
pub fn run_with(
    engine: &Engine,
    mut graph: Graph,
    limits: &Limits,
    share_rows: bool,
) -> Result<Outcome, Error> {
    tokenize_prompts(engine, &mut graph)?;
    let manifest = engine.manifest();
    let plan = plan(&graph, &manifest, limits)?;
    run_planned(engine, &graph, &plan, &manifest, share_rows)
}

/// Runs a tokenized, validated graph on a full model.
///
/// # Errors
/// Failures while running.
pub fn run_planned(
    engine: &Engine,
    graph: &Graph,
    plan: &Plan,
    manifest: &Manifest,
    share_rows: bool,
) -> Result<Outcome, Error> {
    run_many(engine, &[(graph, plan)], manifest, share_rows)
        .pop()
        .expect("one outcome per graph")
}

/// Runs several tokenized, validated graphs together: at every step, the
/// forwards of all graphs still running are one packed forward
/// ([`forward_steps`]), as a stage batches concurrent requests. Each
/// outcome is the one [`run_planned`] gives the graph alone, up to the
/// rounding of a matrix product over more rows; a graph that fails fails
/// alone.
pub fn run_many(
    engine: &Engine,
    graphs: &[(&Graph, &Plan)],
    manifest: &Manifest,
    share_rows: bool,
) -> Vec<Result<Outcome, Error>> {
    let model = &engine.model;
    let _guard = tch::no_grad_guard();
    let mut runs: Vec<Result<Run, Error>> = graphs
        .iter()
        .map(|&(graph, plan)| {
            let mut store = Store::new(graph, manifest, model, None)?;
            if !share_rows {
                store.disable_row_sharing();
            }
            Ok(Run {
                graph,
                plan,
                store,
                trace: None,
                generated: Vec::new(),
            })
        })
        .collect();
    loop {
        for run in &mut runs {
            if let Ok(r) = run
                && let Err(e) = r.start_trace(engine)
            {
                *run = Err(e);
            }
        }
        let active: Vec<usize> = (0..runs.len())
            .filter(|&i| runs[i].as_ref().is_ok_and(|r| r.trace.is_some()))
            .collect();
        if active.is_empty() {
            break;
        }
        let outs = {
            let mut execs = Vec::with_capacity(active.len());
            for run in runs.iter_mut().flatten() {
                let Run {
                    graph,
                    plan,
                    store,
                    trace: Some(trace),
                    ..
                } = run
                else {
                    continue;
                };
                let mut exec = Executor::new(graph, plan, manifest, model, store);
                exec.begin(trace.index as u32, trace.step, &trace.padded.lens);
                execs.push((exec, trace));
            }
            let steps = execs
                .iter_mut()
                .map(|(exec, trace)| Step {
                    exec,
                    padded: &trace.padded,
                    step: trace.step,
                    input: Input::Tokens(trace.input.shallow_clone()),
                    cache: &mut trace.cache,
                })
                .collect();
            forward_steps(model, model.layers(), steps)
        };
        for (i, out) in active.into_iter().zip(outs) {
            let run = &mut runs[i];
            if let Err(e) = out
                .map_err(Error::from)
                .and_then(|out| run.as_mut().map_or(Ok(()), |r| r.advance(out)))
            {
                *run = Err(e);
            }
        }
    }
    runs.into_iter()
        .map(|run| {
            let mut run = run?;
            Ok(Outcome {
                saves: run.store.take_saves(),
                generated: run.generated,
            })
        })
        .collect()
}

/// One graph in [`run_many`].
struct Run<'g> {
    graph: &'g Graph,
    plan: &'g Plan,
    store: Store,
    /// The trace running, if any.
    trace: Option<Trace>,
    /// Per finished trace, per invoke: the tokens generated.
    generated: Vec<Vec<Vec<u32>>>,
}

/// A trace in progress.
struct Trace {
    index: usize,
    step: u32,
    padded: Padded,
    cache: Cache,
    /// The next step's token ids.
    input: Tensor,
    tokens: Vec<Vec<u32>>,
}

impl Run<'_> {
    /// Starts the next trace when none runs and one remains.
    fn start_trace(&mut self, engine: &Engine) -> Result<(), Error> {
        let index = self.generated.len();
        if self.trace.is_some() || index == self.graph.traces.len() {
            return Ok(());
        }
        let prompts = trace_prompts(self.graph, index);
        let max_new = self.graph.traces[index].max_new_tokens as usize;
        engine.check_prompts(&prompts, max_new)?;
        let padded = Padded::new(&prompts, engine.model.device());
        self.trace = Some(Trace {
            index,
            step: 0,
            input: padded.ids.shallow_clone(),
            cache: engine.model.new_cache(),
            tokens: vec![Vec::new(); prompts.len()],
            padded,
        });
        Ok(())
    }

    /// Takes a step's output (`None`: the graph stopped the forward): the
    /// next token when the trace generates, else the trace's end.
    fn advance(&mut self, logits: Option<Tensor>) -> Result<(), Error> {
        let trace = self.trace.as_mut().expect("a running trace");
        let generating = self.graph.traces[trace.index].max_new_tokens > 0;
        let mut ended = true;
        if let (Some(logits), true) = (logits, generating) {
            let next = logits.f_select(1, -1)?.f_argmax(-1, false)?;
            for (row, id) in trace.tokens.iter_mut().zip(Vec::<i64>::try_from(&next)?) {
                row.push(id as u32);
            }
            trace.input = next.unsqueeze(1);
            trace.step += 1;
            ended = trace.step == self.plan.steps[trace.index];
        }
        if ended {
            let done = self.trace.take().expect("a running trace");
            self.generated.push(done.tokens);
        }
        Ok(())
    }
}

/// Runs one step's forward through layers `span` of `model` under `exec`
/// (already begun, carry inserted): picks the step's batch layout (prompt,
/// or one new token per row), applies row sharing, then ends the step. Returns the model's output
/// (logits on the last stage, else the hidden state), or `None` when the
/// graph stopped the forward early.
///
/// # Errors
/// When a hook or a node fails.
pub fn forward_step(
    model: &Model,
    span: std::ops::Range<usize>,
    exec: &mut Executor<'_>,
    padded: &Padded,
    step: u32,
    input: Input,
    cache: &mut Cache,
) -> Result<Option<Tensor>, HookError> {
    let one = Step {
        exec,
        padded,
        step,
        input,
        cache,
    };
    forward_steps(model, span, vec![one])
        .pop()
        .expect("one result per step")
}

/// One request's step in [`forward_steps`]: its executor (begun, carry
/// inserted), prompt layout, step index, input and KV cache.
#[derive(Debug)]
pub struct Step<'a, 'e> {
    /// The request's interpreter for this step.
    pub exec: &'a mut Executor<'e>,
    /// The trace's padded prompts.
    pub padded: &'a Padded,
    /// The step index (0 = the prompt).
    pub step: u32,
    /// Token ids or hidden state.
    pub input: Input,
    /// The trace's KV cache on these layers.
    pub cache: &'a mut Cache,
}

/// As [`forward_step`] for several requests' steps at once, as one packed
/// forward ([`Model::forward_packed`]): each request keeps its own rows,
/// positions, cache and graph, and stops or fails alone.
pub fn forward_steps(
    model: &Model,
    span: std::ops::Range<usize>,
    steps: Vec<Step<'_, '_>>,
) -> Vec<Result<Option<Tensor>, HookError>> {
    let (mut ends, inputs): (Vec<_>, Vec<_>) = steps
        .into_iter()
        .map(|s| {
            let (batch, input) = layout(model, s.exec, s.padded, s.step, s.input);
            ((s.exec, s.cache, batch), input)
        })
        .unzip();
    let segments = ends
        .iter_mut()
        .zip(inputs)
        .map(|((exec, cache, batch), input)| Segment {
            input,
            batch,
            cache: Some(&mut **cache),
            hooks: &mut **exec,
        })
        .collect();
    let outs = model.forward_packed(span, segments);
    ends.into_iter()
        .zip(outs)
        .map(|((exec, _, _), out)| {
            let out = match out {
                Ok(t) => Some(t),
                Err(HookError::Stop) => None,
                Err(e) => return Err(e),
            };
            exec.finish()?;
            Ok(out)
        })
        .collect()
}

/// A step's batch layout and input: the prompt's, or one new token per
/// row; with shared rows, one row of positions for all.
fn layout(
    model: &Model,
    exec: &Executor<'_>,
    padded: &Padded,
    step: u32,
    input: Input,
) -> (Batch, Input) {
    if let Some(rows) = exec.input_rows() {
        // Invokes share rows: their prompts have one length and no padding,
        // so one row of positions serves every physical row.
        let batch = Batch::contiguous(1, padded.ids.size()[1], 0, model.device());
        let input = match input {
            Input::Tokens(ids) => {
                let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                let idx = Tensor::from_slice(&rows).to_device(model.device());
                Input::Tokens(ids.index_select(0, &idx))
            }
            hidden => hidden,
        };
        return (batch, input);
    }
    let batch = if step == 0 {
        Batch {
            positions: padded.batch.positions.shallow_clone(),
            key_mask: padded.batch.key_mask.as_ref().map(Tensor::shallow_clone),
        }
    } else {
        padded.next_step(step as usize)
    };
    (batch, input)
}
