"""Decode tokens/s of npgpt fp32 / bf16 / int8 and PyTorch float32 in one run (GPT-2 124M shapes,
random weights, 32-token prompt + 128 new, greedy), each in its own `npgpt.bench` worker subprocess.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_quant_decode.py B REPS

Needs torch and transformers in the same environment. Same workers as `npgpt bench --workloads decode
--weights W --decode-batch B --compare torch`, but PyTorch runs once for the three npgpt packings.
"""
import sys
import time

from npgpt.bench import _run_worker, DEFAULTS, blas_info
from npgpt.config import GPTConfig
cfg = GPTConfig.from_preset("gpt2").to_hparams()
B = int(sys.argv[1]); reps = int(sys.argv[2])
print("blas:", blas_info(), flush=True)
out = {}
for fw, w in [("npgpt", "fp32"), ("npgpt", "bf16"), ("npgpt", "int8"), ("torch", "fp32")]:
    opts = dict(DEFAULTS, threads=2, steps=1, reps=reps, weights=w, decode_B=B)
    t = time.strftime("%H:%M:%S")
    r = _run_worker(fw, "decode", cfg, opts)
    out[f"{fw}-{w}"] = r
    print(t, fw, w, f"B={B}", f"{r['tokens_per_s']:.1f} tok/s", r.get("weight_bytes", ""), flush=True)
tt = out["torch-fp32"]["tokens_per_s"]
for k in ("fp32", "bf16", "int8"):
    print(f"B={B} npgpt {k} / torch fp32: {out['npgpt-'+k]['tokens_per_s']/tt:.2f}x")
