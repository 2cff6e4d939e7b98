"""A trained checkpoint loads unchanged in qt (qt-chat's LLM), the server (load_generators + HTTP) and transformers.

    python benchmarks/train_load_check.py /work/runs/tiny/best
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import transformers
from fastapi.testclient import TestClient

from qt_serve.api import create_app, load_generators
from qt_serve.checkpoint import load

PROMPT = "ROMEO.\nBut soft, what light"


def main() -> None:
    path = sys.argv[1]
    result = {}
    ckpt = load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ckpt.model(ids)).abs().max().item()
    result["transformers"] = {"same_token_ids": ids[0].tolist() == ckpt.tokenizer.encode(PROMPT),
                              "max_abs_logit_diff": diff,
                              "greedy": tok.decode(hf.generate(ids, max_new_tokens=24, do_sample=False)[0])}
    served = load_generators([f"tiny={path}"], max_seq_len=256)
    with TestClient(create_app(served)) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 24,
                                                 "temperature": 0})
        result["server"] = {"status": r.status_code, "text": r.json()["choices"][0]["text"]}
        r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 16, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Who art thou?"}]})
        result["server"]["chat_status"] = r.status_code
    chat = subprocess.run([sys.executable, "-m", "qt_serve.cli", "--model", path, "--temperature", "0",
                           "--max-tokens", "24", "--max-seq-len", "256"],
                          input="Who art thou?\n/quit\n", capture_output=True, text=True, timeout=120,
                          check=False)
    result["qt_chat"] = {"exit": chat.returncode, "reply": chat.stdout.strip()[-300:]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
