#!/usr/bin/env python3
"""Write the numerics fixture: token ids and logits from Hugging Face
transformers on the same GGUF file nnmesh loads.

    NNMESH_SETUP_REFERENCE=1 scripts/setup.sh
    .venv/bin/python scripts/reference.py [models/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes runtime/tests/fixtures/reference.json (prompts, token ids, greedy
generation, top-k ids and the f64 sum of each case's last logits row) and
runtime/tests/fixtures/reference.safetensors (f32 logits):

- `columns` [512] i64: vocab columns spread over the whole vocabulary, picked
  by a fixed hash of the column index (no RNG, so the choice never drifts
  between library versions);
- `{case}.columns` [t, 512]: the logits of those columns at every position;
- `{case}.top_ids` [t, 10] i64 / `{case}.top_logits` [t, 10]: the largest
  logits at every position (the ones that decide predictions, which a sparse
  sample of columns would almost never hit);
- `{case}.last` [vocab]: the whole last row;

where `{case}` is `prompts.{i}` or `batch.{i}`. Whole rows at every position
would be ~14 MB; this is ~1.3 MB and still covers every position and every
part of the vocabulary.

transformers dequantizes the GGUF to f32 itself (its own reader and its own
un-permutation of q/k), so this is an independent check of our GGUF reader,
tokenizer and Llama forward.
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
FIXTURES = os.path.join(ROOT, "node", "tests", "fixtures")
OUT_JSON = os.path.join(FIXTURES, "reference.json")
OUT_TENSORS = os.path.join(FIXTURES, "reference.safetensors")

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "After John and Mary went to the store, Mary gave a bottle of milk to",
    "In 2024+17 we counted 3141 apples.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
]
# A batch of two prompts of different lengths, left-padded.
BATCH = ["The Eiffel Tower is in the city of", "Hello"]
COLUMNS = 512
TOP_K = 10


def hashed_columns(vocab, n):
    """The n columns whose blake2b hash of the little-endian index is smallest, sorted."""
    key = lambda i: hashlib.blake2b(i.to_bytes(4, "little"), digest_size=8).digest()
    return sorted(sorted(range(vocab), key=key)[:n])


def summarize(name, logits, columns, tensors):
    """logits: [seq, vocab] f32. Puts the case's tensors into `tensors`, returns its JSON part."""
    top = torch.topk(logits, TOP_K, dim=-1)
    tensors[f"{name}.columns"] = logits[:, columns].contiguous()
    tensors[f"{name}.top_ids"] = top.indices.contiguous()
    tensors[f"{name}.top_logits"] = top.values.contiguous()
    tensors[f"{name}.last"] = logits[-1].contiguous()
    return {
        "tensors": name,
        "last_top_ids": top.indices[-1].tolist(),
        "last_logits_sum": float(logits[-1].double().sum()),
    }


def main():
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(GGUF))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    columns = torch.tensor(hashed_columns(model.config.vocab_size, COLUMNS))
    tensors = {"columns": columns}

    cases = []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0]
            cases.append({"prompt": p, "ids": ids, **summarize(f"prompts.{i}", logits, columns, tensors)})

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
            batch.append({"prompt": BATCH[i], "ids": e, **summarize(f"batch.{i}", real, columns, tensors)})

        gen_prompt = "The Eiffel Tower is in the city of"
        ids = tok(gen_prompt, add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        gen = {"prompt": gen_prompt, "ids": out[0, len(ids):].tolist(),
               "text": tok.decode(out[0, len(ids):])}

    source = (f"transformers {transformers.__version__}, torch {torch.__version__}, f32, "
              f"{os.path.basename(GGUF)}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    fixture = {
        "source": source,
        "tensors": os.path.basename(OUT_TENSORS),
        "prompts": cases,
        "batch": batch,
        "generate": gen,
    }
    os.makedirs(FIXTURES, exist_ok=True)
    with open(OUT_JSON, "w") as fh:
        json.dump(fixture, fh, indent=1)
    save_file(tensors, OUT_TENSORS, metadata={"source": source})
    print(f"wrote {OUT_JSON} and {OUT_TENSORS}")


if __name__ == "__main__":
    main()
