#!/usr/bin/env python3
"""The Hugging Face transformers side of `nnmesh bench`: the same prefill and
greedy-decode measurements on the same GGUF, printed as one JSON line.

    bench_hf.py MODEL.gguf '{"prefill_ids": [...], "decode_ids": [...], "decode_tokens": 32, "runs": 5}'
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from transformers import AutoModelForCausalLM

path, spec = sys.argv[1], json.loads(sys.argv[2])
d, f = os.path.split(os.path.abspath(path))
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
load_s = time.perf_counter() - t0

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
print(json.dumps({"load_s": load_s, "prefill_s": prefill_s, "decode_tps": decode_tps,
                  "threads": torch.get_num_threads()}))
