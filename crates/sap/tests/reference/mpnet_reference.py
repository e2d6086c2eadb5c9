"""Independent reference for the MPNet encoder: HF transformers' MPNetModel on a few sentences.

Usage: python3 mpnet_reference.py MODEL_DIR OUT.json [FULL.json]
Writes, per sentence, the token ids, the first 16 values of every token's last hidden state and
the mean-pooled sentence vector (all 768 values); FULL.json (optional) gets every value, for a
max-abs-diff over the whole last hidden state. Needs `pip install torch transformers`.
"""
import json
import sys

import torch
from transformers import AutoTokenizer, MPNetModel

SENTENCES = [
    "self-driving cars just seem lazy and a waste of money",
    "I love it!",
    "you'll never get me in an autonomous vehicle. Ever. Never. #nope 42",
]

model_dir, out = sys.argv[1], sys.argv[2]
full = sys.argv[3] if len(sys.argv) > 3 else None
tok = AutoTokenizer.from_pretrained(model_dir)
model = MPNetModel.from_pretrained(model_dir).eval()
rows = []
full_rows = []
with torch.no_grad():
    for s in SENTENCES:
        enc = tok(s, return_tensors="pt")
        h = model(**enc).last_hidden_state[0]
        rows.append(
            {
                "text": s,
                "ids": enc["input_ids"][0].tolist(),
                "head16": h[:, :16].tolist(),
                "mean": h.mean(0).tolist(),
            }
        )
        full_rows.append({"ids": enc["input_ids"][0].tolist(), "hidden": h.tolist()})
json.dump({"model": "all-mpnet-base-v2", "sentences": rows}, open(out, "w"))
if full:
    json.dump(full_rows, open(full, "w"))
print("ok", [len(r["ids"]) for r in rows])
