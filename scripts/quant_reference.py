#!/usr/bin/env python3
"""Write runtime/tests/fixtures/quants.json: random blocks of each GGUF type we
dequantize, with the floats that gguf-py (llama.cpp's own Python package)
dequantizes them to. Run with the venv after NNMESH_SETUP_REFERENCE=1 scripts/setup.sh."""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "node", "tests", "fixtures", "quants.json")
rng = np.random.default_rng(7)

# type -> (block bytes, offsets of f16 fields inside a block)
LAYOUT = {
    T.F16: (2, [0]),
    T.BF16: (2, []),
    T.Q4_0: (18, [0]),
    T.Q4_1: (20, [0, 2]),
    T.Q8_0: (34, [0]),
    T.Q4_K: (144, [0, 2]),
    T.Q6_K: (210, [208]),
}
BLOCK_ELEMS = {T.F16: 1, T.BF16: 1}

cases = []
for ty, (nbytes, f16_at) in LAYOUT.items():
    elems = BLOCK_ELEMS.get(ty, 256 if ty in (T.Q4_K, T.Q6_K) else 32)
    n_blocks = 512 // elems
    raw = bytearray(rng.integers(0, 256, size=n_blocks * nbytes, dtype=np.uint8).tobytes())
    if ty == T.BF16:
        vals = rng.standard_normal(n_blocks).astype(np.float32)
        raw = bytearray((vals.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    for b in range(n_blocks):
        for off in f16_at:
            v = np.float16(rng.uniform(-0.1, 0.1))
            raw[b * nbytes + off: b * nbytes + off + 2] = v.tobytes()
    data = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(1, -1)
    out = quants.dequantize(data, ty).reshape(-1).astype(np.float32)
    cases.append({"type": int(ty), "name": ty.name, "raw": bytes(raw).hex(), "values": out.tolist()})

with open(OUT, "w") as fh:
    json.dump(cases, fh)
print(f"wrote {OUT}")
