"""Decoding's time a token in two checkouts (old, new) of npgpt, alternated round by round, each round a
fresh process per checkout: GPT-2 124M shapes (random weights) with fp32 rows, bf16 or int8 weights, a batch
of B rows, 128 tokens after a 32-token prompt, the median of 3 timed decodes after one warm-up. Prints each
round and the median of the paired ratios new / old with their spread. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
are unset for these runs only.

    git worktree add /tmp/base REV
    python examples/bench_decode_checkouts.py /tmp/base . --weights bf16 --batch 8 --rounds 4
"""
import argparse
import os
import statistics
import subprocess
import sys


def worker(weights: str, B: int, reps: int = 3) -> None:
    """In the checkout on PYTHONPATH: the milliseconds a token of `reps` decodes, on one line."""
    from npgpt.fast import settings
    settings.apply(inference=True)
    import time
    import numpy as np
    import npgpt
    from npgpt.inference import quant
    from npgpt.inference.decode import Decoder
    P, NEW = 32, 128
    cfg = npgpt.GPTConfig.from_preset("gpt2")
    model = quant.decode_layout(quant.quantize(npgpt.GPT(cfg, dtype=np.float32, seed=0).eval(), weights))
    prompt = np.random.default_rng(0).integers(0, cfg.n_vocab, (B, P))

    def decode():
        dec = Decoder(model, B, P + NEW)
        logits = dec.prefill(list(prompt))
        t = time.perf_counter()
        for _ in range(NEW):
            logits = dec.step(logits.argmax(-1))
        return (time.perf_counter() - t) / NEW
    decode()
    print(" ".join(f"{decode() * 1e3:.4f}" for _ in range(reps)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--weights", choices=["fp32", "bf16", "int8"], default="fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    ratios = []
    for r in range(args.rounds):
        ms = {}
        for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            tree = os.path.abspath(getattr(args, name))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", args.weights, str(args.batch)],
                                 cwd=tree, env=dict(env, PYTHONPATH=tree), capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            ms[name] = statistics.median(float(v) for v in out.stdout.split())
        ratios.append(ms["new"] / ms["old"])
        print(f"round {r}: old {ms['old']:.3f} ms new {ms['new']:.3f} ms, new / old {ratios[-1]:.3f}", flush=True)
    print(f"{args.weights} B={args.batch}, a token: new / old median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}, {args.rounds} rounds)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
