"""Train-step throughput of one process against several MPI ranks, and the gradient Allreduce's cost.

    python examples/bench_mpi.py --threads 2                       # 1 rank x 2 threads
    mpiexec -n 2 python examples/bench_mpi.py --threads 1          # 2 ranks x 1 thread

Random tokens, a GPT of --layers/--heads/--embd (default: npgpt train's --config small with the
GPT-2 vocabulary), global batch --batch x --context, AdamW; the first two steps (Numba compilation,
first-touch page faults) are not counted. Rank 0 prints one JSON line: median step time, tokens/s,
the time allreduce_grads took inside the steps (the communication left exposed after the backward,
including waiting for the slower rank) and its share of the step, how many gradient buckets
started during the backward, the whole Allreduce timed alone after a barrier (communication +
pack/unpack only), and bytes per rank per step. The measurement is npgpt.bench.npgpt_train_ranks,
which `npgpt bench --grid` runs at every ranks x threads split.

    mpiexec -n 2 python examples/bench_mpi.py --threads 1 --overlap both   # before/after, alternated

--overlap on (the default) sums each block's gradients while the blocks below are in backward, off
sums them all after the backward (distributed.OVERLAP = False), both alternates the two step by step
(ABBA, --steps of each after the first two) and prints a line for each.
"""
from __future__ import annotations

import argparse
import json

from npgpt.fast import settings
settings.apply()   # before NumPy: npgpt's OpenBLAS settings

from npgpt.bench import blas_info, cpu_model, npgpt_train_ranks


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
    cfg = dict(n_vocab=a.vocab, n_ctx=a.context, n_embd=a.embd, n_head=a.heads, n_layer=a.layers)
    overlap = {"on": (True,), "off": (False,), "both": (True, False, False, True)}[a.overlap]
    for row in npgpt_train_ranks(cfg, a.batch, a.context, a.steps, a.threads, overlap) or []:   # rank 0 prints
        print(json.dumps(dict(row, cpu=cpu_model(), blas=blas_info())))


if __name__ == "__main__":
    main()
