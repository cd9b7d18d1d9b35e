#!/usr/bin/env python3
"""The Hugging Face transformers side of `nnmesh bench`: the same load,
prefill and greedy-decode measurements on the same GGUF, printed as one JSON
line.

transformers dequantizes a GGUF in numpy, which is slow, so the load is also
timed from the same weights as a safetensors folder: with `safetensors_dir`
in the spec, the GGUF is saved there as a plain f32 checkpoint (once, when
the folder is missing), then loaded from it. nnmesh times its own load of
the folder after this script.

    bench_hf.py MODEL.gguf '{"prefill_ids": [...], "decode_ids": [...], "decode_tokens": 32, "runs": 5, "safetensors_dir": "target/reference/..."}'
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path, spec = sys.argv[1], json.loads(sys.argv[2])
d, f = os.path.split(os.path.abspath(path))
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
load_s = time.perf_counter() - t0


def save_safetensors(out):
    """Saves the dequantized GGUF as a plain checkpoint (config.json,
    model.safetensors, tokenizer.json) at `out`, atomically."""
    # transformers will not save a model it loaded from GGUF ("quantized");
    # after its dequantization the weights are plain f32, so save them so.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    part = f"{out}.part{os.getpid()}"
    model.save_pretrained(part)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(part)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(part, out)


load_safetensors_s = None
if spec.get("safetensors_dir"):
    out = spec["safetensors_dir"]
    if not os.path.exists(os.path.join(out, "config.json")):
        save_safetensors(out)
    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    load_safetensors_s = time.perf_counter() - t0

prefill = torch.tensor([spec["prefill_ids"]])
decode = torch.tensor([spec["decode_ids"]])
n = spec["decode_tokens"]
runs = spec["runs"]
with torch.no_grad():
    model(prefill)  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model(prefill)
        times.append(time.perf_counter() - t)
    prefill_s = statistics.median(times)
    model.generate(decode, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        model.generate(decode, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        rates.append(n / (time.perf_counter() - t))
    decode_tps = statistics.median(rates)
print(json.dumps({"load_s": load_s, "load_safetensors_s": load_safetensors_s,
                  "prefill_s": prefill_s, "decode_tps": decode_tps,
                  "threads": torch.get_num_threads()}))
