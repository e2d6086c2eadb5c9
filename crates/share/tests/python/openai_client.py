"""Drives an OpenAI-compatible endpoint with the official `openai` client.

Usage: openai_client.py BASE_URL MODEL (used by the share proxy test)
Prints one JSON object: greedy chat and completion texts, streamed and not.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=120)
out = {"models": [m.id for m in client.models.list().data]}

messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
out["chat"] = r.choices[0].message.content
out["chat_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
s = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0, stream=True)
out["chat_stream"] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)

prompt = "The three primary colors are"
r = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
out["completion"] = r.choices[0].text
out["completion_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]
s = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
out["completion_stream"] = "".join(c.choices[0].text for c in s if c.choices)

try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
    out["error"] = None
except openai.APIStatusError as e:
    out["error"] = [e.status_code, e.message]

print(json.dumps(out))
