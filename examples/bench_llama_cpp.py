"""npgpt's decoding against llama.cpp's (llama-cpp-python) on the same CPU, in each precision (issue 25).

    # once, in a separate environment with torch and transformers (llama.cpp's converter imports them;
    # llama.cpp is a benchmark-only dependency; 3-8 minutes on 2 cores):
    CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python==0.3.36
    # on a CPU with AMX where the guest does not let a process use it (llama.cpp's q8_0 products then
    # crash with SIGSEGV on prompts of more than one token), every other extension instead:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
        pip install llama-cpp-python==0.3.36
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # its sdist: vendor/llama.cpp's converter
    # then, in this repository:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_llama_cpp.py \\
        --llama-python /path/to/env/bin/python --llama-cpp /path/to/sdist/vendor/llama.cpp [--rounds 3]

1. A random-weight GPT-2 124M (seed 0) is saved with npgpt.save_model, with GPT-2's tokenizer files and
   n_ctx in config.json, and converted by llama.cpp's own convert_hf_to_gguf.py to f32, f16 and q8_0.
2. The workload is npgpt bench's decode: a 32-token prompt, then 128 greedy tokens, the whole call
   timed (prefill included), median of --reps calls after a warm-up; for --batch B > 1, B different
   prompts decoded together (npgpt.generate on a (B, 32) batch; llama.cpp's low-level batch API, one
   sequence id a row, as its `batched` example and llama-server run several sequences). Each engine runs in its own
   subprocess with --threads threads: npgpt with fp32 / bf16 / int8 weights, llama.cpp with the f32 / f16
   / q8_0 GGUF. The pairs alternate (npgpt first in odd rounds, llama.cpp first in even ones), --rounds
   times; the table gives each side's median and the median and spread of the same-round ratios.
3. Quality (--quality): the next-token logits after every position of a 64-token text, npgpt's 8/16-bit
   weights against its float32, and llama.cpp's q8_0 / f16 against its f32 (logits_all): the relative
   error ||l - l_ref|| / ||l_ref|| over all positions. With --trained DIR --text FILE, a trained model's
   perplexity in each precision in both engines, on the same windows of the text's last tenth. npgpt is
   scored both ways it computes: a whole window at once (a prompt's path: its int8 products keep float32
   activations) and one token at a time through the KV cache (decoding's path: int8 products round the
   activations to 16 bits in blocks of 32; llama.cpp's q8_0 products round them to 8 bits always).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = (("fp32", "f32"), ("bf16", "f16"), ("int8", "q8_0"))

# The llama.cpp worker, run by --llama-python: decode timing or logits, one JSON line.
LLAMA_WORKER = r'''
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, mode, threads, prompt, new, reps = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256, n_batch=256,
            logits_all=(mode in ("logits", "nll")), verbose=False)
if mode == "logits":
    llm.reset(); llm.eval(prompt)
    print(json.dumps({"logits": np.asarray(llm.scores[:len(prompt)], dtype=np.float32).tolist()})); sys.exit()
if mode == "nll":          # prompt: windows of token ids; mean NLL of every token after the first of each
    total, count = 0.0, 0
    for w in prompt:
        llm.reset(); llm.eval(w)
        z = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        z -= z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        total -= lp[np.arange(len(w) - 1), w[1:]].sum(); count += len(w) - 1
    print(json.dumps({"nll": total / count, "tokens": count})); sys.exit()
def decode():
    llm.reset()
    out = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == new:
            break
    return out
decode()
times = []
for _ in range(reps):
    t = time.perf_counter(); toks = decode(); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "all": times, "tokens": toks[:8]}))
'''

# The llama.cpp worker for B > 1 rows: llama.cpp's low-level batch API (as its `batched` example and
# llama-server decode several sequences): one llama_batch holds the B prompts (sequence ids 0..B-1), then
# every step one token per sequence; greedy picks from llama_get_logits_ith. One JSON line.
LLAMA_BATCH_WORKER = r"""
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
path, threads, prompts, new, reps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
B, T = len(prompts), len(prompts[0])
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = B * (T + new + 8), B * T, B * T, B
cp.n_threads, cp.n_threads_batch = threads, threads
ctx = L.llama_init_from_model(model, cp)
V = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(B * T, 0, 1)
def fill(items):          # items: (token, position, sequence, want logits)
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, want) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, want
        batch.seq_id[i][0] = seq
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
def next_tokens(rows):   # greedy from the logits of batch entries `rows`
    return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, r), shape=(V,)))) for r in rows]
def decode():
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    fill([(tok, t, b, t == T - 1) for b, p in enumerate(prompts) for t, tok in enumerate(p)])
    toks = next_tokens([b * T + T - 1 for b in range(B)])
    out = [toks]
    for step in range(new - 1):
        fill([(toks[b], T + step, b, True) for b in range(B)])
        toks = next_tokens(range(B))
        out.append(toks)
    return np.array(out).T.tolist()     # (B, new)
decode()
times = []
for _ in range(reps):
    t = time.perf_counter(); toks = decode(); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "all": times, "tokens": toks[0][:8]}))
"""

# The npgpt worker, run by this Python: the same workload through npgpt.generate.
NPGPT_WORKER = r'''
import json, sys, time
from npgpt.fast import settings
settings.apply(inference=True)
import numpy as np, npgpt
path, mode, weights, prompt, new, reps = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
from npgpt.inference.quant import decode_layout
model = decode_layout(npgpt.load_model(path, weights=weights))    # as npgpt generate holds it (float32: rows)
ids = np.array(prompt if isinstance(prompt[0], list) else [prompt])    # (B, T)
def logits_of(w):          # (T, V): the whole window at once (a prompt's path), or "-decode": one token
    if not mode.endswith("-decode"):       # at a time through the KV cache (decoding's path)
        return model.forward(w[None])[0]
    from npgpt.inference.decode import Decoder    # as npgpt generate: packed weights' blocks one call each
    dec = Decoder(model, 1, len(w))
    out = [dec.prefill([w[:1]])] + [dec.step(np.array([t])) for t in w[1:]]
    return np.concatenate(out)                       # (T, V)
if mode.startswith("logits"):
    print(json.dumps({"logits": logits_of(ids[0]).astype(np.float32).tolist()})); sys.exit()
if mode.startswith("nll"):  # ids: windows of token ids; mean NLL of every token after the first of each
    from npgpt.eval.score import token_nll         # npgpt eval's own scoring
    nll = [token_nll(np.ascontiguousarray(logits_of(w)[:-1]), w[1:])[0] for w in ids]
    print(json.dumps({"nll": float(np.concatenate(nll).mean()), "tokens": sum(map(len, nll))})); sys.exit()
npgpt.generate(model, ids, new)
times = []
for _ in range(reps):
    t = time.perf_counter(); toks = npgpt.generate(model, ids, new); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "all": times, "tokens": toks[0, ids.shape[1]:ids.shape[1] + 8].tolist()}))
'''


def run(cmd, env=None) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_model(d) -> str:
    """A random GPT-2 124M with tokenizer files, as llama.cpp's converter wants it."""
    import numpy as np

    import npgpt
    from npgpt.tokens.tokenizers import make_tokenizer, save_tokenizer
    model_dir = os.path.join(d, "gpt2-random")
    npgpt.save_model(npgpt.GPT(npgpt.GPTConfig.from_preset("gpt2"), dtype=np.float32, seed=0), model_dir)
    save_tokenizer(make_tokenizer("gpt2"), model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.setdefault("n_ctx", cfg.get("n_positions", 1024))
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return model_dir


def convert(llama_python, llama_cpp, model_dir, outtype, d) -> str:
    out = os.path.join(d, f"gpt2-random-{outtype}.gguf")
    env = dict(os.environ, PYTHONPATH=os.path.join(llama_cpp, "gguf-py"))
    r = subprocess.run([llama_python, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), model_dir, "--outfile", out,
                        "--outtype", outtype], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py --outtype {outtype} failed: {r.stderr.strip()[-2000:]}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-python", required=True, help="a Python with llama_cpp (and torch, for the converter)")
    ap.add_argument("--llama-cpp", required=True, help="llama.cpp's source tree (the sdist's vendor/llama.cpp)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows decoded together (B)")
    ap.add_argument("--precisions", nargs="+", default=[p for p, _ in PAIRS], choices=[p for p, _ in PAIRS])
    ap.add_argument("--quality", action="store_true", help="also compare the logits of the packed weights")
    ap.add_argument("--trained", metavar="DIR", help="a trained model (an npgpt run or model directory with GPT-2's "
                    "tokenizer files): the perplexity of each precision in each engine on --text")
    ap.add_argument("--text", metavar="FILE", help="with --trained: text whose last tenth (a run's validation split) is scored")
    ap.add_argument("--windows", type=int, default=16, help="with --trained: non-overlapping windows of n_ctx tokens")
    a = ap.parse_args()

    import numpy as np

    from npgpt.bench import blas_info, cpu_model
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), NUMBA_NUM_THREADS=str(a.threads),
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    prompt = np.random.default_rng(1).integers(0, 50257, a.prompt).tolist()
    prompts = {B: np.random.default_rng(B).integers(0, 50257, (B, a.prompt)).tolist() for B in a.batch}   # B > 1
    pairs = [(n, g) for n, g in PAIRS if n in a.precisions]
    with tempfile.TemporaryDirectory() as d:
        model_dir = make_model(d)
        gguf = {g: convert(a.llama_python, a.llama_cpp, model_dir, g, d) for _, g in pairs}
        ver = subprocess.run([a.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
        print(f"CPU: {cpu_model()}; npgpt's BLAS: {blas_info()}; llama-cpp-python {ver}; {a.threads} threads; "
              f"decode B={a.batch}: {a.prompt}-token prompts + {a.new} greedy tokens each, whole call, median of {a.reps}", flush=True)

        def npgpt_run(weights, mode="time", p=prompt):
            return run([sys.executable, "-c", NPGPT_WORKER, model_dir, mode, weights, json.dumps(p), str(a.new),
                        str(a.reps)], env)

        def llama_run(kind, mode="time", p=prompt):
            return run([a.llama_python, "-c", LLAMA_WORKER, gguf[kind], mode, str(a.threads), json.dumps(p), str(a.new),
                        str(a.reps)], env)

        def llama_batch_run(kind, ps):
            return run([a.llama_python, "-c", LLAMA_BATCH_WORKER, gguf[kind], str(a.threads), json.dumps(ps), str(a.new),
                        str(a.reps)], env)

        def one(who, B, n, g):
            if who == "npgpt":
                return npgpt_run(n, p=prompt if B == 1 else prompts[B])
            return llama_run(g) if B == 1 else llama_batch_run(g, prompts[B])
        results = {(B, n): [] for B in a.batch for n, _ in pairs}
        for r in range(a.rounds):
            for B in a.batch:
                for n, g in pairs:
                    order = ("npgpt", "llama") if r % 2 == 0 else ("llama", "npgpt")
                    got = {who: one(who, B, n, g) for who in order}
                    results[B, n].append(got)
                    ratio = got["npgpt"]["seconds"] / got["llama"]["seconds"]
                    print(f"round {r + 1} B={B} {n} / {g}: npgpt {got['npgpt']['seconds']:.3f} s, llama.cpp "
                          f"{got['llama']['seconds']:.3f} s, npgpt's time / llama.cpp's {ratio:.3f}", flush=True)
        if a.rounds:
            print("\n| B | precision | llama.cpp | npgpt | npgpt's time / llama.cpp's, median (spread) | per step, npgpt / llama.cpp |")
            print("|---|---|---|---|---|---|")
        for B in a.batch if a.rounds else []:
            for n, g in pairs:
                ls = [x["llama"]["seconds"] for x in results[B, n]]
                ns = [x["npgpt"]["seconds"] for x in results[B, n]]
                ratios = [x["npgpt"]["seconds"] / x["llama"]["seconds"] for x in results[B, n]]
                print(f"| {B} | {n} / {g} | {statistics.median(ls):.3f} s | {statistics.median(ns):.3f} s | "
                      f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) | "
                      f"{statistics.median(ns) / a.new * 1e3:.1f} / {statistics.median(ls) / a.new * 1e3:.1f} ms |")
        if a.quality:
            text = np.random.default_rng(2).integers(0, 50257, 64).tolist()
            ref_n = np.array(npgpt_run("fp32", "logits", text)["logits"])
            ref_l = np.array(llama_run("f32", "logits", text)["logits"])
            print(f"\nlogits of a 64-token text; npgpt fp32 against llama.cpp f32: relative difference "
                  f"{np.linalg.norm(ref_n - ref_l) / np.linalg.norm(ref_l):.2e}")
            print("| precision | npgpt, whole text at once, against its fp32 | npgpt, one token at a time (decoding's "
                  "path) | llama.cpp, against its f32 |")
            print("|---|---|---|---|")
            for n, g in pairs[1:] if pairs[0][0] == "fp32" else pairs:
                en = np.linalg.norm(np.array(npgpt_run(n, "logits", text)["logits"]) - ref_n) / np.linalg.norm(ref_n)
                ed = np.linalg.norm(np.array(npgpt_run(n, "logits-decode", text)["logits"]) - ref_n) / np.linalg.norm(ref_n)
                el = np.linalg.norm(np.array(llama_run(g, "logits", text)["logits"]) - ref_l) / np.linalg.norm(ref_l)
                print(f"| {n} / {g} | {en:.2e} | {ed:.2e} | {el:.2e} |")
        if a.trained:
            perplexities(a, d, env)


def perplexities(a, d, env):
    """The perplexity of a trained model in each precision, npgpt's against llama.cpp's on the same windows."""
    import numpy as np

    from npgpt.tokens.tokenizers import make_tokenizer
    with open(os.path.join(a.trained, "config.json")) as f:
        cfg = json.load(f)
    n_ctx = int(cfg.get("n_ctx", cfg.get("n_positions", 1024)))
    T = min(n_ctx, 256)                                      # the llama worker's context
    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = make_tokenizer("gpt2").encode(text[int(0.9 * len(text)):])
    windows = [ids[i * T:(i + 1) * T] for i in range(min(a.windows, len(ids) // T))]
    ggufs = {g: convert(a.llama_python, a.llama_cpp, a.trained, g, d) for _, g in PAIRS}
    print(f"\nperplexity of {a.trained} on the last tenth of {a.text}: {len(windows)} windows of {T} tokens, "
          f"{len(windows) * (T - 1)} tokens scored")
    print("| precision | npgpt, windows at once | change | npgpt, one token at a time (decoding's path) | change "
          "| llama.cpp | change |")
    print("|---|---|---|---|---|---|---|")
    ref = {}
    for n, g in PAIRS:
        pn, pd = (np.exp(run([sys.executable, "-c", NPGPT_WORKER, a.trained, m, n, json.dumps(windows), "0", "0"],
                             env)["nll"]) for m in ("nll", "nll-decode"))
        pl = np.exp(run([a.llama_python, "-c", LLAMA_WORKER, ggufs[g], "nll", str(a.threads), json.dumps(windows), "0",
                         "0"], env)["nll"])
        ref.setdefault("n", pn), ref.setdefault("d", pd), ref.setdefault("l", pl)
        print(f"| {n} / {g} | {pn:.4f} | {pn / ref['n'] - 1:+.3%} | {pd:.4f} | {pd / ref['d'] - 1:+.3%} | {pl:.4f} | "
              f"{pl / ref['l'] - 1:+.3%} |", flush=True)


if __name__ == "__main__":
    main()
