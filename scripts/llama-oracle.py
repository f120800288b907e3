#!/usr/bin/env python3
"""llama.cpp (PyPI llama-cpp-python) as the oracle and peer of Switchyard's GGUF CPU backend.

Reads a JSON request on stdin:
  {"model": PATH, "threads": 2, "n_ctx": 2048, "n_batch": 512,
   "cases": [{"messages": [{"role", "content"}...]} | {"text": STR} | {"ids": [INT...]},
             "max_new": 32, "stop": [INT...]}...]}
and writes one JSON object to stdout:
  {"llama_cpp_python": VERSION, "cases": [{"text", "ids", "tokens", "prefill_s", "decode_s"}...]}

`messages` are rendered with the GGUF's own `tokenizer.chat_template` (jinja2 with the
settings transformers uses: trim_blocks, lstrip_blocks, add_generation_prompt) into `text`;
`text` is tokenized by llama.cpp (special tokens parsed, no BOS) into `ids`. Then `ids` run in
one eval and greedy decoding follows, one token per eval, argmax with the lowest id on ties,
until `max_new` tokens or a `stop` id. `prefill_s` times the prompt's eval, `decode_s` the
evals after the first generated token. Run it with the venv of scripts/llama-venv.sh.
"""
import json
import sys
import time

import jinja2
import numpy as np
from llama_cpp import Llama, __version__


def last_logits(llm):
    # llama-cpp-python >= 0.3 no longer copies logits into `scores` unless logits_all is set;
    # the context's buffer holds the last evaluated token's row.
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm._n_vocab,))


def render(template, messages):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token="<|im_end|>"
    )


def main():
    req = json.load(sys.stdin)
    llm = Llama(
        model_path=req["model"],
        n_ctx=req.get("n_ctx", 2048),
        n_batch=req.get("n_batch", 512),
        n_ubatch=req.get("n_batch", 512),
        n_threads=req.get("threads", 2),
        n_threads_batch=req.get("threads", 2),
        logits_all=False,
        verbose=False,
    )
    template = llm.metadata.get("tokenizer.chat_template", "")
    out = []
    for case in req["cases"]:
        text = case.get("text")
        if "messages" in case:
            text = render(template, case["messages"])
        ids = case.get("ids")
        if ids is None:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        stop = set(case.get("stop", []))
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t0
        tokens = [int(np.argmax(last_logits(llm)))]
        t1 = time.perf_counter()
        while len(tokens) < case["max_new"] and tokens[-1] not in stop:
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(last_logits(llm))))
        decode = time.perf_counter() - t1
        out.append(
            {
                "text": text,
                "ids": [int(i) for i in ids],
                "tokens": tokens,
                "prefill_s": prefill,
                "decode_s": decode,
            }
        )
    json.dump({"llama_cpp_python": __version__, "cases": out}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
