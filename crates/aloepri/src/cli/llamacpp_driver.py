"""Runs one GGUF with an unmodified llama.cpp (llama-cpp-python) on token ids.

Usage: python3 llamacpp_driver.py request.json answer.json

request: {"model": path, "n_ctx": int, "threads": int, "kv_type": 0 (F32) or 1 (F16),
          "seqs": [[id, ...], ...],
          "prompts": [[id, ...], ...], "max_tokens": int, "stop": [id, ...]}
answer:  {"seqs": [{"argmax": [...], "nll": [...]}, ...], "greedy": [[id, ...], ...],
          "n_vocab": int, "seconds": float}
`argmax[i]` is the most likely next id after position i; `nll[i]` the negative log-probability
of seqs[i + 1]. Greedy decoding is the argmax of the logits (no sampler), stopped on `stop` ids
(not included) or after `max_tokens`.
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main():
    req = json.load(open(sys.argv[1]))
    t0 = time.time()
    llm = Llama(
        model_path=req["model"],
        n_ctx=req["n_ctx"],
        n_batch=req["n_ctx"],
        n_threads=req["threads"],
        logits_all=True,
        type_k=req["kv_type"],
        type_v=req["kv_type"],
        vocab_only=False,
        verbose=False,
    )
    out = {"seqs": [], "greedy": [], "n_vocab": llm.n_vocab()}
    for ids in req["seqs"]:
        llm.reset()
        llm.eval(ids)
        s = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        m = s.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(s - m).sum(axis=1)))
        nxt = np.asarray(ids[1:], dtype=np.int64)
        nll = lse[:-1] - s[np.arange(len(ids) - 1), nxt]
        out["seqs"].append({"argmax": s.argmax(axis=1).tolist(), "nll": nll.tolist()})
    stop = set(req["stop"])
    for p in req["prompts"]:
        llm.reset()
        llm.eval(p)
        gen = []
        for _ in range(req["max_tokens"]):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if t in stop:
                break
            gen.append(t)
            llm.eval([t])
        out["greedy"].append(gen)
    out["seconds"] = time.time() - t0
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
