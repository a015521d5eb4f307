"""`npgpt serve` throughput at GPT-2 124M shapes (random weights), and what batch invariance costs.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. python examples/bench_serve.py \\
        [--requests 16] [--max-tokens 64] [--clients 1 4 8] [--weights fp32] [--rounds 1]

1. The decoding step alone, A rows at context 128: the ordinary batched step (GPT.forward_cached on A
   rows: BLAS GEMMs, not batch-invariant), npgpt serve's batch-invariant step (npgpt/serve/batched.py,
   "kernels") and one row at a time ("rows"); median ms per step over 10.
2. The server: the random model is saved to a temporary directory and served with `npgpt serve
   --parallel 8`; C clients (for each C of --clients) share --requests greedy completions (a 24-token
   prompt each, max_tokens new tokens, not streamed) and the wall time from the first request to the
   last answer gives requests/s and generated tokens/s. With C = 1 the requests run one after another.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_costs(model, rows=(1, 4, 8), context=128, reps=10):
    from npgpt.inference.kvcache import KVCache
    from npgpt.serve.batched import BatchedStep
    step = BatchedStep(model)
    print(f"| rows | ordinary batched step (BLAS) | batch-invariant step | one row at a time |")
    print(f"|---:|---:|---:|---:|")
    for A in rows:
        cache = KVCache.for_model(model, A)
        model.forward_cached(np.random.default_rng(0).integers(0, 50257, (A, context)), cache)
        tokens, ids = np.zeros(A, np.int64), np.arange(A)

        def timed(fn):
            fn()
            ts = []
            for _ in range(reps):
                cache.lengths[:] = context
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return 1e3 * float(np.median(ts))
        blas = timed(lambda: model.forward_cached(tokens[:, None], cache))
        kernels = timed(lambda: step(cache, ids, tokens))
        step.mode = "rows"
        rows_ms = timed(lambda: step(cache, ids, tokens))
        step.mode = "kernels"
        print(f"| {A} | {blas:.1f} ms ({A / blas * 1e3:.0f} tok/s) | {kernels:.1f} ms ({A / kernels * 1e3:.0f} tok/s) "
              f"| {rows_ms:.1f} ms ({A / rows_ms * 1e3:.0f} tok/s) |", flush=True)


def serve(model_dir, weights, parallel=8):
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "serve", "--model", model_dir, "--port", "0",
                             "--parallel", str(parallel), "--weights", weights], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("npgpt serve did not start")


def load(url, clients, requests, max_tokens):
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    words = "the of and to in is was that for on with as by at from his her it an be are this which".split()
    prompts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(24)) for i in range(requests)]
    todo, lock, done = list(prompts), threading.Lock(), []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                p = todo.pop()
            r = c.completions.create(model="m", prompt=p, max_tokens=max_tokens, temperature=0)
            with lock:
                done.append(r.usage.completion_tokens)
    c.completions.create(model="m", prompt=prompts[0], max_tokens=2, temperature=0)          # warm
    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return len(done) / wall, sum(done) / wall, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument("--rounds", type=int, default=1, help="repeat the client counts, every other round in reverse order")
    args = ap.parse_args()

    from npgpt.fast import settings
    settings.apply(inference=True)
    import npgpt
    from npgpt.bench import blas_info
    from npgpt.inference.quant import decode_layout, quantize
    print("blas:", blas_info(), flush=True)
    model = npgpt.GPT(npgpt.GPTConfig.from_preset("gpt2"), dtype=np.float32, seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        npgpt.save_model(model, d)
        step_costs(decode_layout(quantize(model, args.weights)))      # as npgpt serve holds it
        del model
        proc, url = serve(d, args.weights)
        try:
            print(f"\n| round | concurrent clients | requests/s | generated tokens/s | wall ({args.requests} requests, "
                  f"{args.max_tokens} tokens each) |")
            print("|---:|---:|---:|---:|---:|")
            for r in range(args.rounds):
                for c in (args.clients if r % 2 == 0 else args.clients[::-1]):
                    rps, tps, wall = load(url, c, args.requests, args.max_tokens)
                    print(f"| {r + 1} | {c} | {rps:.2f} | {tps:.1f} | {wall:.1f} s |", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
