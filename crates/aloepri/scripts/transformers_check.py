"""Loads an obfuscated HF checkpoint with stock transformers and compares it with the plaintext one.

Usage: python transformers_check.py PLAIN_DIR OBF_DIR KEY_FILE [N_TEXTS]

Both folders are loaded with `AutoModelForCausalLM.from_pretrained` (float32, CPU). Each text is
tokenized with the plaintext tokenizer, the obfuscated model gets the tau-permuted ids, and its
logits are un-permuted (`logits[:, tau]`). Prints the transformers version, top-1 agreement,
the largest logit difference relative to the largest logit, and whether a greedy continuation
is the same; exits 1 if a model does not load or top-1 agreement is below 0.999.

Run by `crates/aloepri/tests/transformers_check.rs` (an ignored test: the test command does not
install torch; `pip install torch transformers` in a venv and point UMBRA_TRANSFORMERS_PYTHON at
its python).
"""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and the Louvre museum.",
    "def reverse(s):\n    return s[::-1]\n\nprint(reverse('hello'))",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "A binary search halves the search interval at every step until the target is found.",
]


def main():
    plain_dir, obf_dir, key_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else len(TEXTS)
    tau = torch.tensor(json.load(open(key_file))["tau"])
    print("transformers", transformers.__version__, "torch", torch.__version__)
    tok = AutoTokenizer.from_pretrained(plain_dir)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    try:
        obf = AutoModelForCausalLM.from_pretrained(obf_dir, dtype=torch.float32).eval()
    except Exception as e:  # the refusal is the finding
        print("LOAD FAILED:", type(e).__name__, str(e).splitlines()[0][:300])
        sys.exit(1)
    print("obfuscated hidden_size", obf.config.hidden_size, "heads", obf.config.num_attention_heads,
          "head_dim", getattr(obf.config, "head_dim", None))
    agree = total = 0
    rel = 0.0
    greedy_same = 0
    with torch.no_grad():
        for text in TEXTS[:n]:
            ids = tok(text, return_tensors="pt").input_ids
            lp = plain(ids).logits[0]
            lo = obf(tau[ids]).logits[0][:, tau]
            agree += (lp.argmax(-1) == lo.argmax(-1)).sum().item()
            total += ids.shape[1]
            rel = max(rel, ((lo - lp).abs().max() / lp.abs().max()).item())
            gp = plain.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
            go = obf.generate(tau[ids], max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
            inv = torch.argsort(tau)
            greedy_same += int(torch.equal(gp, inv[go]))
    print(f"positions {total}  top1_agreement {agree / total:.4f}  max_rel_logit_diff {rel:.2e}  "
          f"greedy_same {greedy_same}/{n}")
    sys.exit(0 if agree / total >= 0.999 else 1)


if __name__ == "__main__":
    main()
