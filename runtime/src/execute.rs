//! Running a whole Intervention Graph on one node: tokenize its prompts,
//! validate it, then run each trace (one forward, or greedy generation with a
//! KV cache) under the interpreter, and collect the saved values.

use nnmesh_graph::{Graph, Inputs, Limits, Manifest, Plan, Prompt, ValidateError, validate};
use tch::Tensor;

use crate::{
    engine::{Engine, EngineError, Padded},
    hooks::HookError,
    interpret::{Executor, SavedTensor, Store},
    models::llama::{Batch, Cache, Input, Model},
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
    let model = &engine.model;
    let mut state = Store::new(graph, manifest, model, None)?;
    if !share_rows {
        state.disable_row_sharing();
    }
    let _guard = tch::no_grad_guard();
    let mut generated = Vec::new();
    for (t, _) in graph.traces.iter().enumerate() {
        let prompts = trace_prompts(graph, t);
        engine.check_prompts(&prompts, graph.traces[t].max_new_tokens as usize)?;
        let padded = Padded::new(&prompts, model.device());
        let lens = padded.lens.clone();
        let steps = plan.steps[t];
        let mut cache = model.new_cache();
        let mut input = padded.ids.shallow_clone();
        let mut tokens = vec![Vec::new(); prompts.len()];
        for step in 0..steps {
            let mut exec = Executor::new(graph, plan, manifest, model, &mut state);
            exec.begin(t as u32, step, &lens);
            let ids = Input::Tokens(input.shallow_clone());
            let logits = forward_step(
                model,
                model.layers(),
                &mut exec,
                &padded,
                step,
                ids,
                &mut cache,
            )?;
            let generating = graph.traces[t].max_new_tokens > 0;
            let Some(logits) = logits else { break };
            if !generating {
                break;
            }
            let next = logits.f_select(1, -1)?.f_argmax(-1, false)?;
            let ids = Vec::<i64>::try_from(&next)?;
            for (row, id) in tokens.iter_mut().zip(ids) {
                row.push(id as u32);
            }
            input = next.unsqueeze(1);
        }
        generated.push(tokens);
    }
    Ok(Outcome {
        saves: state.take_saves(),
        generated,
    })
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
    let next_batch;
    let mut batch = if step == 0 {
        &padded.batch
    } else {
        next_batch = padded.next_step(step as usize);
        &next_batch
    };
    let shared;
    let mut input = input;
    if let Some(rows) = exec.input_rows() {
        // Invokes share rows: their prompts have one length and no padding,
        // so one row of positions serves every physical row.
        shared = Batch::contiguous(1, padded.ids.size()[1], 0, model.device());
        batch = &shared;
        if let Input::Tokens(ids) = input {
            let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let idx = Tensor::from_slice(&rows).to_device(model.device());
            input = Input::Tokens(ids.index_select(0, &idx));
        }
    }
    let out = match model.forward_span(input, span, batch, Some(cache), exec) {
        Ok(t) => Some(t),
        Err(HookError::Stop) => None,
        Err(e) => return Err(e),
    };
    exec.finish()?;
    Ok(out)
}
