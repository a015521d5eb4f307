"""Which ops of a GPT-2 training step use every core: each op's own time at 1 and at 2 (or N) threads,
in one process, the thread counts alternated round by round (issue 22).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape gpt2 --B 4 --T 64
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape gpt2 --B 8 --T 256
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_ops.py --shape nanogpt --B 12 --T 64

An op is a layer's forward or backward (its own time: what it runs itself, not the ops it calls), a
Numba kernel, the weight-gradient GEMM (Parameter.add_matmul) or a step of the optimizer; "step glue"
is the step's wall time minus every op's. Each op's speed-up from 1 to N threads says whether it uses
the cores: an op near 1.0x runs on one core while the others wait. The table gives each op's share of
the N-thread step, then the time of the ops that gain less than --serial-below, then the same by kind
(matrix products, attention, optimizer and clipping, the rest, the glue).

The last lines extrapolate to --predict threads with Amdahl's law, op by op and for the bare step
whole: an op taking t1 on one thread and tN on N has a serial fraction f = (tN / t1 - 1/N) / (1 - 1/N)
(clipped to [0, 1]), and is predicted to take t1 (f + (1 - f) / P) on P threads (unclipped, the two
agree: the sum is linear; op by op includes the timers' cost, the bare step does not). It ignores what
only shows with more cores (memory bandwidth, cache sizes, GEMMs that split better or worse), so it is
a forecast, not a figure. The timers cost about a microsecond a call, so the step is also timed without
them ("bare").

With --framework torch the same is done to PyTorch's step (npgpt.bench.torch_step: transformers'
GPT2LMHeadModel, cross-entropy, clipping, AdamW), each aten op's own time taken by torch.profiler (ops
inside AdamW's step or the clipping named after it: "Optimizer.step#AdamW.step > aten::add_"), so that
the two frameworks are compared kind by kind, and forecast by one method, on one machine. The profiler
costs more than npgpt's timers (a few microseconds an op, and PyTorch's step runs thousands): compare
its "timed" step with the bare one before reading its kinds' speed-ups. It needs a Python with torch
and transformers, and npgpt on its path:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE PYTHONPATH=. TORCH_VENV/bin/python examples/profile_ops.py \
        --framework torch --shape nanogpt --B 12 --T 64
"""
import argparse
import os
import time
from collections import defaultdict

SHAPES = {"gpt2": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
          "small": dict(n_vocab=50257, n_ctx=256, n_embd=384, n_head=6, n_layer=6),        # npgpt train --config small
          "nanogpt": dict(n_vocab=65, n_ctx=64, n_embd=128, n_head=4, n_layer=4)}        # shakespeare_char on a CPU
ap = argparse.ArgumentParser()
ap.add_argument("--shape", choices=list(SHAPES), default="gpt2")
ap.add_argument("--B", type=int, default=4)
ap.add_argument("--T", type=int, default=64)
ap.add_argument("--threads", type=int, default=os.cpu_count(), help="the many-thread count compared with 1")
ap.add_argument("--steps", type=int, default=5, help="timed steps per round and thread count")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--serial-below", type=float, default=1.25, help="speed-up under which an op counts as serial")
ap.add_argument("--rows", type=int, default=30)
ap.add_argument("--predict", type=int, default=16,
                help="thread count to extrapolate the step to (Amdahl, op by op and whole)")
ap.add_argument("--framework", choices=("npgpt", "torch"), default="npgpt",
                help="whose train step: npgpt's (default), or PyTorch's (aten ops timed by torch.profiler)")
args = ap.parse_args()
GLUE = "step glue (untimed Python)"

if args.framework == "npgpt":
    from npgpt.fast import settings
    settings.apply()   # as `npgpt train` runs: before NumPy loads OpenBLAS
import numpy as np  # noqa: E402


def npgpt_profiler():
    """(info, set_threads(n), step(), timed_steps(n) -> (wall seconds, {op: own seconds}, {op: calls}))
    for npgpt's train step, every layer's forward/backward, Numba kernel, weight-gradient GEMM and AdamW
    wrapped in npgpt.bench.OpClock."""
    import numba
    from threadpoolctl import ThreadpoolController

    import npgpt
    from npgpt import fast, layers
    from npgpt.bench import OpClock, blas_info
    from npgpt.layers.module import Parameter
    from npgpt.train.lm import count_targets, lm_loss
    from npgpt.train.loop import train_step

    clock = OpClock()
    for cls in (layers.Embedding, layers.PositionEmbedding, layers.Dropout, layers.Block, layers.LayerNorm,
                layers.CausalSelfAttention, layers.MLP, layers.Linear, layers.GELU, layers.TiedLMHead, npgpt.GPT):
        for meth in ("forward", "forward_without_bias", "backward", "attend", "backward_hidden", "forward_hidden"):
            if meth in vars(cls):
                setattr(cls, meth, clock.wrap(f"{cls.__name__}.{meth}", vars(cls)[meth]))
    for name in fast._KERNELS:
        setattr(fast, name, clock.wrap(f"kernel {name}", getattr(fast, name)))
    Parameter.add_matmul = clock.wrap("weight-grad GEMM (add_matmul)", Parameter.add_matmul)
    Parameter.zero_grad = clock.wrap("Parameter.zero_grad", Parameter.zero_grad)
    npgpt.AdamW.step = clock.wrap("AdamW.step", npgpt.AdamW.step)

    cfg = SHAPES[args.shape]
    model = npgpt.GPT(npgpt.GPTConfig(**cfg), seed=0)
    opt = npgpt.AdamW(model, lr=1e-4)
    rng = np.random.default_rng(0)
    # NumPy's BLAS only: the fused attention keeps SciPy's (its tiles' np.dot) on one thread
    numpy_blas = [lib for lib in ThreadpoolController().lib_controllers if "numpy" in lib.filepath]

    def set_threads(threads):
        for lib in numpy_blas:
            lib.set_num_threads(threads)
        numba.set_num_threads(threads)

    def step():
        idx = rng.integers(0, cfg["n_vocab"], (args.B, args.T))
        train_step(model, opt, (idx, np.roll(idx, -1, axis=1)), 1e-4, loss_fn=lm_loss, count_fn=count_targets)

    def timed_steps(n):
        clock.clear()
        clock.on = True
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = time.perf_counter() - t0
        clock.on = False
        return wall, dict(clock.own), dict(clock.calls)

    return f"blas: {blas_info()}", set_threads, step, timed_steps


def torch_profiler():
    """The same for PyTorch's train step (npgpt.bench.torch_step), its aten ops' own CPU time from
    torch.profiler (each op's self time: what it ran itself, not the ops it called)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from npgpt.bench import _torch_model, torch_adamw, torch_step

    clip = torch.nn.utils.clip_grad_norm_

    def clip_in_scope(*a, **k):             # torch_step looks it up at each call: its ops are named after it
        with record_function(CLIP):
            return clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = clip_in_scope

    cfg = SHAPES[args.shape]
    model = _torch_model(cfg, train=True)
    opt = torch_adamw(model)
    g = torch.Generator().manual_seed(0)

    def step():
        torch_step(model, model, opt, torch.randint(0, cfg["n_vocab"], (args.B, args.T), generator=g))

    def scope(e):
        """The optimizer's or clipping's scope an event runs in (its outermost such ancestor), or None."""
        found = None
        while e is not None:
            if e.name.startswith(("Optimizer.", CLIP)):
                found = e.name
            e = e.cpu_parent
        return found

    def timed_steps(n):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            wall = time.perf_counter() - t0
        own, calls = defaultdict(float), defaultdict(int)
        for e in prof.events():
            where = scope(e)                 # AdamW's aten::add_ apart from the forward's
            name = e.name if where in (None, e.name) else f"{where} > {e.name}"
            own[name] += e.self_cpu_time_total * 1e-6
            calls[name] += 1
        return wall, own, calls

    blas = [line.split(":")[0].strip() for line in torch.__config__.parallel_info().splitlines() if "Math Kernel" in line]
    info = f"torch {torch.__version__}, BLAS: {blas[0] if blas else 'not MKL'}"
    return info, torch.set_num_threads, step, timed_steps


KINDS = ("matrix products", "attention", "optimizer and clipping", "the rest", GLUE)
CLIP = "clip_grad_norm_"                    # the scope PyTorch's clipping runs in, under the profiler


def kind(op):
    """Which of KINDS an op of either framework belongs to, so the two can be compared kind by kind. npgpt's
    Linear and TiedLMHead layers' own time is their GEMMs (the bias add, GELU and LayerNorm are kernels);
    PyTorch's optimizer and clipping are every op run inside AdamW's step or zero_grad or clip_grad_norm_."""
    if op == GLUE:
        return GLUE
    if op.startswith(("Optimizer.", CLIP, "kernel adamw", "kernel sum_of_squares", "AdamW.", "Parameter.zero_grad")):
        return "optimizer and clipping"
    if op.startswith(("aten::mm", "aten::addmm", "aten::bmm", "weight-grad GEMM", "Linear.", "TiedLMHead.")):
        return "matrix products"
    if "attention" in op.lower() or ("softmax" in op and not op.startswith("aten::_log_softmax")):   # not the loss's
        return "attention"
    return "the rest"


def amdahl(t1, tN, N, P):
    """(time on P threads, serial time) of work taking t1 on one thread and tN on N, by Amdahl's law:
    serial fraction f = (tN / t1 - 1/N) / (1 - 1/N), clipped to [0, 1]; all of it serial if N is 1."""
    f = min(1.0, max(0.0, (tN / t1 - 1 / N) / (1 - 1 / N))) if t1 > 0 and N > 1 else 1.0
    return t1 * (f + (1 - f) / P), t1 * f


def main():
    N = args.threads
    info, set_threads, step, timed_steps = (torch_profiler if args.framework == "torch" else npgpt_profiler)()
    print(f"{args.framework}: shape {args.shape} {SHAPES[args.shape]}, B={args.B} T={args.T}; threads 1 vs {N}; {info}")

    own = {1: defaultdict(list), N: defaultdict(list)}     # threads -> op -> per-round seconds per step
    wall, bare = {1: [], N: []}, {1: [], N: []}
    calls = {}
    for threads in (1, N):                                  # warm-up: compile both kernel builds, start the timers
        set_threads(threads)
        for _ in range(2):
            step()
        timed_steps(1)
    for r in range(args.rounds):
        for threads in ((1, N) if r % 2 == 0 else (N, 1)):
            set_threads(threads)
            t, ops, calls = timed_steps(args.steps)
            b = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                b.append(time.perf_counter() - t0)
            bare[threads].append(np.median(b))
            wall[threads].append(t / args.steps)
            for name, s in ops.items():
                own[threads][name].append(s / args.steps)
            own[threads][GLUE].append((t - sum(ops.values())) / args.steps)

    med = {th: {name: float(np.median(v)) for name, v in ops.items()} for th, ops in own.items()}
    step1, stepN = np.median(wall[1]), np.median(wall[N])
    print(f"step, bare: 1 thread {np.median(bare[1]) * 1e3:.1f} ms, {N} threads {np.median(bare[N]) * 1e3:.1f} ms "
          f"({np.median(bare[1]) / np.median(bare[N]):.2f}x); timed: {step1 * 1e3:.1f} ms, {stepN * 1e3:.1f} ms "
          f"(median of {args.rounds} rounds x {args.steps} steps)")
    print(f"| op | calls/step | 1 thread ms | {N} threads ms | speed-up | share of the {N}-thread step |")
    print("|---|---|---|---|---|---|")

    def gain(name):
        return med[1].get(name, 0.0) / med[N][name] if med[N][name] > 0 else float("inf")

    serial = sum(med[N][name] for name in med[N] if gain(name) < args.serial_below)    # every op, printed or not
    for name in sorted(med[N], key=lambda k: -med[N][k])[:args.rows]:
        t1, tN = med[1].get(name, 0.0), med[N][name]
        mark = " (serial)" if gain(name) < args.serial_below else ""
        print(f"| {name}{mark} | {calls.get(name, 0) / args.steps:.0f} | {t1 * 1e3:.2f} | {tN * 1e3:.2f} | {gain(name):.2f}x "
              f"| {tN / stepN:.1%} |")
    print(f"ops gaining under {args.serial_below}x from {N} threads: {serial * 1e3:.2f} ms, {serial / stepN:.1%} of the step")
    print(f"| kind | 1 thread ms | {N} threads ms | speed-up | share of the {N}-thread step |")
    print("|---|---|---|---|---|")
    for k in KINDS:
        t1 = sum(t for name, t in med[1].items() if kind(name) == k)
        tN = sum(t for name, t in med[N].items() if kind(name) == k)
        if tN > 0:
            print(f"| {k} | {t1 * 1e3:.2f} | {tN * 1e3:.2f} | {t1 / tN:.2f}x | {tN / stepN:.1%} |")
    P, predicted, serial_P = args.predict, 0.0, 0.0
    for name, t1 in med[1].items():
        tP, ts = amdahl(t1, med[N].get(name, t1), N, P)
        predicted, serial_P = predicted + tP, serial_P + ts
    print(f"Amdahl, op by op, at {P} threads: {predicted * 1e3:.1f} ms a step ({step1 / predicted:.1f}x one thread), "
          f"of which {serial_P * 1e3:.1f} ms serial ({serial_P / predicted:.0%})")
    b1 = np.median(bare[1])
    tP, ts = amdahl(b1, np.median(bare[N]), N, P)
    print(f"Amdahl, the bare step whole, at {P} threads: {tP * 1e3:.1f} ms a step ({b1 / tP:.1f}x one thread; "
          f"serial fraction {ts / b1:.2f})")


if __name__ == "__main__":
    main()
