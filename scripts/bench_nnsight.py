#!/usr/bin/env python3
"""The NNsight side of `nnmesh bench --graphs`: a plain forward, a 30-layer
logit lens and 30-layer activation patching (one trace per layer, the way
NNsight tutorials write it) on the same GGUF and token ids, as one JSON line.

    bench_nnsight.py MODEL.gguf '{"lens_ids": [...], "clean_ids": [...], "corrupt_ids": [...], "runs": 3}'
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
hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = LanguageModel(hf, tokenizer=tok)
layers = model.model.layers
n = len(layers)
runs = spec["runs"]
JOHN, MARY = spec["answer"], spec["wrong"]


def hidden(out):
    return out[0] if isinstance(out, tuple) else out


def median_time(fn):
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


lens_ids = torch.tensor([spec["lens_ids"]])
clean = torch.tensor([spec["clean_ids"]])
corrupt = torch.tensor([spec["corrupt_ids"]])


def plain(ids):
    with torch.no_grad():
        hf(ids)


def lens():
    outs = []
    with model.trace(lens_ids):
        for l in range(n):
            h = hidden(layers[l].output)[:, -1, :]
            outs.append(model.lm_head(model.model.norm(h)).save())


def patching():
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


result = {
    "plain_lens_s": median_time(lambda: plain(lens_ids)),
    "plain_ioi_s": median_time(lambda: plain(corrupt)),
    "lens_s": median_time(lens),
}
try:
    result["patch_s"] = median_time(patching)
    result["patched_last"] = patching()[-1]
except Exception as e:  # report, don't hide: the Rust side prints it
    result["patch_error"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(result))
