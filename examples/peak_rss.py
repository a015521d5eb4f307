"""Peak resident memory of one GPT-2 124M train step and of one evaluation pass.

    PYTHONPATH=. python examples/peak_rss.py [--B 8] [--T 256] [--dtype float32] [--dropout 0.0]

(PYTHONPATH=. measures this checkout even where another one is pip-installed; each line names the
npgpt it ran.)

Each workload runs in a fresh subprocess (random init, no checkpoint), which reports
resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak, model and optimiser state included.

    train: forward, cross_entropy(out=logits), zero_grad + backward, clip_grad_norm, AdamW step
    eval:  forward in eval mode under npgpt.no_grad() (where it exists), loss only
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys


def worker(kind, B, T, dtype, dropout):
    import numpy as np

    import npgpt
    cfg = npgpt.GPTConfig.from_preset("gpt2", dropout=dropout)
    model = npgpt.GPT(cfg, dtype=np.dtype(dtype), seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.n_vocab, (B, T))
    targets = np.roll(idx, -1, axis=1)
    if kind == "train":
        opt = npgpt.AdamW(model, lr=1e-4)
        model.zero_grad()
        logits = model.forward(idx)
        loss, dlogits = npgpt.cross_entropy(logits, targets, out=logits)
        model.backward(dlogits)
        npgpt.clip_grad_norm(model, 1.0)
        opt.step()
    else:
        model.eval()
        no_grad = getattr(npgpt, "no_grad", contextlib.nullcontext)   # absent before issue 12
        with no_grad():
            loss, _ = npgpt.cross_entropy(model.forward(idx), targets)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 ** 2   # KiB -> GiB
    print(json.dumps({"kind": kind, "loss": float(loss), "peak_rss_gib": rss, "npgpt": npgpt.__file__}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--worker", choices=["train", "eval"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.B, a.T, a.dtype, a.dropout)
    for kind in ("train", "eval"):
        out = subprocess.run([sys.executable, __file__, "--worker", kind, "--B", str(a.B), "--T", str(a.T),
                              "--dtype", a.dtype, "--dropout", str(a.dropout)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{kind:5s} B={a.B} T={a.T} {a.dtype} dropout={a.dropout}: peak RSS {r['peak_rss_gib']:.2f} GiB (loss {r['loss']:.4f}; "
              f"{r['npgpt']})")


if __name__ == "__main__":
    main()
