#!/usr/bin/env python3
"""The NNsight side of `nnmesh bench --graphs`: a plain forward, a 30-layer
logit lens and 30-layer activation patching on the same GGUF and token ids,
each experiment in two forms, as one JSON line:

- the lens as a head per layer over a full forward (as NNsight tutorials
  write it), and as one stacked head followed by `tracer.stop()`;
- patching as one trace per layer (as the tutorials write it), and as 31
  invokes of one trace (1 clean + 30 patched) that cross the clean values
  to the patched invokes with `tracer.barrier(2)`, NNsight 0.8's mechanism,
  applying the head at the last position only and stopping there, as
  nnmesh's graph does.

Each form reports its median time and what it computed (the lens's top
logits per layer, the patched logit differences), so the Rust side can check
it against nnmesh's own run; a form that fails reports its error instead.

    bench_nnsight.py MODEL.gguf '{"lens_ids": [...], "clean_ids": [...], "corrupt_ids": [...], "answer": 1, "wrong": 2, "runs": 3}'
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

torch.set_grad_enabled(False)
from nnsight import LanguageModel
from transformers import AutoModelForCausalLM, AutoTokenizer

path, spec = sys.argv[1], json.loads(sys.argv[2])
d, f = os.path.split(os.path.abspath(path))
hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = LanguageModel(hf, tokenizer=tok)
layers = model.model.layers
n = len(layers)
runs = spec["runs"]
JOHN, MARY = spec["answer"], spec["wrong"]
# The lens's top logits per layer that go back for the agreement check.
TOP_K = 5


def hidden(out):
    return out[0] if isinstance(out, tuple) else out


def median_time(fn):
    """The median seconds of `runs` calls after one warm-up, and the last result."""
    out = fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


lens_ids = torch.tensor([spec["lens_ids"]])
clean = torch.tensor([spec["clean_ids"]])
corrupt = torch.tensor([spec["corrupt_ids"]])


def plain(ids):
    hf(ids)


def lens_per_layer():
    # A head per layer; the forward runs to its own head over every position.
    outs = []
    with model.trace(lens_ids):
        for l in range(n):
            h = hidden(layers[l].output)[:, -1, :]
            outs.append(model.lm_head(model.model.norm(h)).save())
    return torch.cat(outs)


def lens_stacked():
    # One head call over all layers' last positions, and the forward stops
    # there instead of running the model's own norm and head.
    with model.trace(lens_ids) as tracer:
        hs = []
        for l in range(n):
            hs.append(hidden(layers[l].output)[:, -1, :])
        logits = model.lm_head(model.model.norm(torch.stack(hs))).save()
        tracer.stop()
    return logits[:, 0]


def patching_per_trace():
    # One trace records the clean residual stream of every layer, then one
    # trace per layer patches it into the corrupted run.
    hs = []
    with model.trace(clean):
        for l in range(n):
            hs.append(hidden(layers[l].output)[:, -1, :].save())
    diffs = []
    for l in range(n):
        with model.trace(corrupt):
            hidden(layers[l].output)[:, -1, :] = hs[l]
            logits = model.lm_head.output[0, -1]
            d = (logits[JOHN] - logits[MARY]).save()
        diffs.append(float(d))
    return diffs


def patching_invokes():
    # One batched forward: invoke 0 runs the clean prompt, invoke 1 + l the
    # corrupted one with layer l patched. Invokes run as the model reaches
    # what each asked for, so barrier l pins the clean read of layer l
    # before the patched write. Only the last position's logits are needed:
    # the head runs there, and the forward stops before its own head.
    hs = [None] * n
    diffs = []
    with model.trace() as tracer:
        barriers = [tracer.barrier(2) for _ in range(n)]
        with tracer.invoke(clean):
            for l in range(n):
                hs[l] = hidden(layers[l].output)[:, -1, :]
                barriers[l]()
        for l in range(n):
            with tracer.invoke(corrupt):
                barriers[l]()
                hidden(layers[l].output)[:, -1, :] = hs[l]
                logits = model.lm_head(model.model.norm.output[0, -1])
                diffs.append((logits[JOHN] - logits[MARY]).save())
                tracer.stop()
    return [float(d) for d in diffs]


def lens_result(logits):
    top = logits.topk(TOP_K, dim=-1)
    return {"top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}


def form(name, fn, result):
    """Times one form; reports its error rather than hiding it."""
    try:
        s, out = median_time(fn)
        return {"form": name, "s": s, **result(out)}
    except Exception as e:
        return {"form": name, "error": f"{type(e).__name__}: {e}"[:300]}


print(json.dumps({
    "plain_lens_s": median_time(lambda: plain(lens_ids))[0],
    "plain_ioi_s": median_time(lambda: plain(corrupt))[0],
    "lens": [
        form("a head per layer, full forward", lens_per_layer, lens_result),
        form("stacked head, tracer.stop()", lens_stacked, lens_result),
    ],
    "patching": [
        form("one trace per layer", patching_per_trace, lambda d: {"patched": d}),
        form(f"{n + 1} invokes, tracer.barrier(2), stop()", patching_invokes,
             lambda d: {"patched": d}),
    ],
}))
