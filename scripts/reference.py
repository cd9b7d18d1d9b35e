#!/usr/bin/env python3
"""Write the numerics fixture: token ids and logits from Hugging Face
transformers on the same GGUF file nnmesh loads.

    NNMESH_SETUP_REFERENCE=1 scripts/setup.sh
    .venv/bin/python scripts/reference.py [models/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes node/tests/fixtures/reference.json. transformers dequantizes the GGUF
to f32 itself (its own reader and its own un-permutation of q/k), so this is
an independent check of our GGUF reader, tokenizer and Llama forward.
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "node", "tests", "fixtures", "reference.json")

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "After John and Mary went to the store, Mary gave a bottle of milk to",
    "In 2024+17 we counted 3141 apples.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
# A batch of two prompts of different lengths, left-padded.
BATCH = ["The Eiffel Tower is in the city of", "Hello"]
VOCAB_SLICE = 32
TOP_K = 10


def summarize(logits):
    """logits: [seq, vocab] f32 -> slice of every position + top-k of the last."""
    top = torch.topk(logits[-1], TOP_K)
    return {
        "slice": logits[:, :VOCAB_SLICE].tolist(),
        "last_top_ids": top.indices.tolist(),
        "last_top_logits": top.values.tolist(),
        "last_logits_sum": float(logits[-1].double().sum()),
    }


def main():
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(GGUF))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()

    cases = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            cases.append({"prompt": p, "ids": ids, **summarize(logits)})

        enc = [tok(p, add_special_tokens=False)["input_ids"] for p in BATCH]
        t = max(len(e) for e in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (t - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (t - len(e)) + [1] * len(e) for e in enc])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos).logits
        batch = []
        for i, e in enumerate(enc):
            real = logits[i, t - len(e):]
            batch.append({"prompt": BATCH[i], "ids": e, **summarize(real)})

        gen_prompt = "The Eiffel Tower is in the city of"
        ids = tok(gen_prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        gen = {"prompt": gen_prompt, "ids": out[0, len(ids):].tolist(),
               "text": tok.decode(out[0, len(ids):])}

    fixture = {
        "source": f"transformers {transformers.__version__}, torch {torch.__version__}, f32, {os.path.basename(GGUF)}",
        "vocab_slice": VOCAB_SLICE,
        "prompts": cases,
        "batch": batch,
        "generate": gen,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(fixture, fh, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
