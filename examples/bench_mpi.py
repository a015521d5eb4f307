"""Train-step throughput of one process against several MPI ranks, and the gradient Allreduce's cost.

    python examples/bench_mpi.py --threads 2                       # 1 rank x 2 threads
    mpiexec -n 2 python examples/bench_mpi.py --threads 1          # 2 ranks x 1 thread

Random tokens, a GPT of --layers/--heads/--embd (default: npgpt train's --config small with the
GPT-2 vocabulary), global batch --batch x --context, AdamW; the first step (Numba compilation,
first-touch page faults) is not counted. Rank 0 prints one JSON line: median step time, tokens/s,
the time allreduce_grads took inside the steps (the communication left exposed after the backward,
including waiting for the slower rank) and its share of the step, how many gradient buckets
started during the backward, the whole Allreduce timed alone after a barrier (communication +
pack/unpack only), and bytes per rank per step.

    mpiexec -n 2 python examples/bench_mpi.py --threads 1 --overlap both   # before/after, alternated

--overlap on (the default) sums each block's gradients while the blocks below are in backward, off
sums them all after the backward (distributed.OVERLAP = False), both alternates the two step by step
(ABBA, --steps of each after the first) and prints a line for each.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from npgpt.fast import settings
settings.apply()   # before NumPy: npgpt's OpenBLAS settings
import numpy as np

from npgpt import distributed
from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.optim import AdamW
from npgpt.train.lm import count_targets, lm_loss
from npgpt.train.loop import train_step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--embd", type=int, default=384)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--overlap", choices=("on", "off", "both"), default="on")
    a = p.parse_args()
    d = distributed.init(a.threads)
    cfg = GPTConfig(n_vocab=a.vocab, n_ctx=a.context, n_embd=a.embd, n_head=a.heads, n_layer=a.layers)
    model = GPT(cfg, dtype=np.float32, seed=0)
    d.broadcast_parameters(model)
    opt = AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)
    modes = {"on": [True], "off": [False], "both": [True, False, False, True]}[a.overlap]
    rows = {m: [] for m in modes}                                # per mode: (step s, exposed s, buckets)
    for i in range(a.steps * len(set(modes)) + 1):
        distributed.OVERLAP = modes[(i - 1) % len(modes)] if i else modes[0]
        x = rng.integers(0, a.vocab, (a.batch, a.context))
        batch = (x, np.roll(x, -1, axis=1))
        t0 = time.perf_counter()
        train_step(model, opt, batch, 1e-4, loss_fn=lm_loss, count_fn=count_targets, dist=d)
        if i:                                                    # step 0 compiles and page-faults
            rows[distributed.OVERLAP].append((time.perf_counter() - t0, getattr(d, "allreduce_seconds", 0.0),
                                              getattr(d, "overlapped_buckets", 0)))
    alone = []
    if d.world_size > 1:
        for _ in range(3):
            d.barrier()
            d.allreduce_grads(model)
            alone.append(d.allreduce_seconds)
    if d.is_main:
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
        cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if ln.startswith("Model name")), "?")
        for overlap, got in rows.items():
            step, exposed = (statistics.median(r[k] for r in got) for k in (0, 1))
            print(json.dumps({
                "ranks": d.world_size, "threads": a.threads, "params": model.num_parameters(),
                "overlap": overlap and d.world_size > 1, "step_s": round(step, 4),
                "tokens_per_s": round(a.batch * a.context / step, 1),
                "allreduce_in_step_s": round(exposed, 4), "exposed_pct": round(100 * exposed / step, 2),
                "buckets_in_backward": max(r[2] for r in got),
                "allreduce_alone_s": round(statistics.median(alone), 4) if alone else 0.0,
                "bytes_per_rank_per_step": getattr(d, "bytes_per_step", 0), "cpu": cpu, "blas": blas}))


if __name__ == "__main__":
    main()
