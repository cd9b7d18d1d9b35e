#!/usr/bin/env python3
"""Write tiny random Hugging Face checkpoints and their logits, to test the
safetensors loader and the Llama/Qwen2 code paths that the bundled GGUF does
not exercise (sharded checkpoints with an index, q/k/v biases, Llama-3 RoPE
scaling, untied lm_head).

    NNMESH_SETUP_REFERENCE=1 scripts/setup.sh
    .venv/bin/python scripts/tiny_reference.py

transformers initializes every bias to 0 and every RMSNorm weight to 1, which
would leave the bias path and the norm scaling untested (a runtime that
dropped them would still match). So both are redrawn from a seeded generator:
biases ~ N(0, 0.3^2), norm weights ~ U(0.5, 1.5).

Writes runtime/tests/fixtures/tiny-llama/ (two shards + index),
runtime/tests/fixtures/tiny-qwen2/ and runtime/tests/fixtures/tiny.json.
"""
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "node", "tests", "fixtures")
IDS = [[5, 17, 42, 99, 3, 250, 7, 7, 128], [200, 1, 2]]


def randomize(model, seed):
    """Non-trivial biases and norm weights (see the docstring), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def run(model, name, **save):
    model.eval()
    path = os.path.join(OUT, name)
    model.save_pretrained(path, safe_serialization=True, **save)
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0].tolist() for ids in IDS]
    return {"path": name, "ids": IDS, "logits": logits}


torch.manual_seed(0)
common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-5, torch_dtype="float32")
llama = LlamaForCausalLM(LlamaConfig(
    **common, rope_theta=50000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
qwen = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=True))
fixture = {
    "llama": run(randomize(llama, 1), "tiny-llama", max_shard_size="150KB"),
    "qwen2": run(randomize(qwen, 2), "tiny-qwen2"),
}
with open(os.path.join(OUT, "tiny.json"), "w") as fh:
    json.dump(fixture, fh)
print("wrote", OUT)
