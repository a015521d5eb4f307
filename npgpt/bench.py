"""`npgpt bench`: prefill and decode tokens/s, train-step time, peak memory and start-up time,
optionally side by side with PyTorch (`--compare torch`) in the same run.

Each workload runs in a fresh subprocess (`python -m npgpt.bench WORKER ...`), so its peak RSS is
its own and the two frameworks' thread pools never share a process. Random weights; GPT-2 shapes
from a preset (default gpt2, 124M) or explicit --n-layer etc. With --rounds N each workload runs N
times, npgpt and PyTorch alternately, and the median of the N same-round ratios is reported: on a
shared machine whose speed drifts from one minute to the next, one pair of runs can be far off.

The train and float32 prefill workloads also time their own matrix products alone (gemm_replay,
prefill_gemm_replay), alternating with the real thing in the same process: the ratio to that says
how far npgpt is from its GEMM-bound floor on this machine and BLAS, and for the prefill, PyTorch's
time over that floor is the most the speed ratio could reach here.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from . import signals
from .fast.settings import INFERENCE_BLAS_TIMEOUT, INFERENCE_SPIN_COUNT

WORKLOADS = ("prefill", "decode", "train", "train-large", "train-loop", "startup")
SHAPE = ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab")
DEFAULTS = dict(prefill_T=256, decode_prompt=32, decode_new=128, train_B=4, train_T=64,
                train_large_B=8, train_large_T=256)


def int8_products() -> str:
    """Which instructions int8 decoding's products run on here: npgpt.fast._q8's path for Numba's target
    (avx512-vnni, avx-vnni, avx2 or portable)."""
    from .fast import _q8
    return _q8.instructions()


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    import numpy  # noqa: F401  (loads the BLAS so threadpoolctl sees it)
    parts = [f"{i.get('internal_api')} {i.get('version')} kernel={i.get('architecture')} threads={i.get('num_threads')}"
             for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(parts) or "no BLAS found"


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median(xs):
    from statistics import median          # the middle two averaged for an even count
    return median(xs)


# ----------------------------------------------------------------------------- npgpt workers
def _npgpt_model(cfg):
    import numpy as np

    from .config import GPTConfig
    from .model import GPT
    return GPT(GPTConfig(**cfg), dtype=np.float32, seed=0)


def gemm_replay(cfg, B, T, dtype=None):
    """A callable that runs every GEMM of one GPT-2 train step at (B, T), same shapes and layouts,
    and nothing else (no activations, losses, kernels or optimizer): the step's GEMM-only time on
    this machine and BLAS. Returns (run, flops)."""
    import numpy as np
    dtype = np.float32 if dtype is None else dtype
    rng = np.random.default_rng(0)
    C, V, NH, L = cfg["n_embd"], cfg["n_vocab"], cfg["n_head"], cfg["n_layer"]
    N, hs = B * T, C // NH
    linears = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)] * L
    W = [rng.standard_normal(s, dtype=dtype) for s in linears]
    dW = [np.empty_like(w) for w in W]
    act = {n: rng.standard_normal((N, n), dtype=dtype) for n in (C, 3 * C, 4 * C)}
    wte, dwte = rng.standard_normal((V, C), dtype=dtype), np.empty((V, C), dtype)
    logits = np.empty((N, V), dtype)
    q = rng.standard_normal((B, NH, T, hs), dtype=dtype)
    att = rng.standard_normal((B, NH, T, T), dtype=dtype)

    def run():
        for w in W:                                     # forward of the linears
            act[w.shape[0]] @ w
        for _ in range(L):                              # attention: s = q k^T, y = a v
            q @ q.transpose(0, 1, 3, 2)
            att @ q
        np.matmul(act[C], wte.T, out=logits)            # LM head
        np.matmul(logits, wte)                          # its backward: dx and dwte
        np.matmul(logits.T, act[C], out=dwte)
        for w, dw in zip(W, dW):                        # backward of the linears: dW and dx
            np.matmul(act[w.shape[0]].T, act[w.shape[1]], out=dw)
            act[w.shape[1]] @ w.T
        for _ in range(L):                              # backward of attention: da, dv, dq, dk
            att @ q
            att.transpose(0, 1, 3, 2) @ q
            att @ q
            att.transpose(0, 1, 3, 2) @ q
    flops = 2 * N * sum(a * b for a, b in linears) * 3 + 2 * N * C * V * 3 + L * 6 * 2 * B * NH * T * T * hs
    return run, flops


def prefill_gemm_replay(model, T, block=None):
    """A callable that runs the matrix products of one prefill of T tokens into an empty cache (B=1)
    with `model`'s own weights, and nothing else: the linears (the last block's attention projection
    and MLP on its one kept row, as GPT.forward_cached runs them), the attention's products and the
    LM head on the last row. When the model's attention runs the fused kernel at this T, its products
    are that kernel's tiles (query blocks of `block` rows against the key blocks up to the diagonal,
    np.dot on one core per head, heads in parallel, as npgpt.fast.flash_attention runs them);
    else q k^T and a v over all T x T. The last block's one query always takes the second form.
    The prefill's GEMM-only time on this machine and BLAS. Returns (run, flops), the flops counted
    from the products a run multiplies."""
    import numpy as np
    from numba import njit, prange

    from .fast.flash_attention import BLOCK, single_threaded_tile_blas
    block = BLOCK if block is None else block
    C, NH = model.config.n_embd, model.config.n_head
    hs, L = C // NH, len(model.h)
    fused = model.h[0].attn.runs_fused(T)
    dt = model.wte.weight.data.dtype
    rng = np.random.default_rng(0)
    act = {n: rng.standard_normal((T, n)).astype(dt) for n in (C, 4 * C)}    # inputs of the linears
    q = rng.standard_normal((1, NH, T, hs)).astype(dt)                       # queries = keys = values
    count = [0]
    counting = True                                  # only the first run counts (the timed runs do no bookkeeping)

    def mm(a, b):                                    # a @ b, counting 2 m k n for each matrix of the batch
        if counting:
            *batch, m, k = a.shape
            count[0] += 2 * int(np.prod(np.broadcast_shapes(tuple(batch), b.shape[:-2]))) * m * k * b.shape[-1]
        return a @ b

    @njit(parallel=True, cache=False)
    def tiles(q, block):                             # the fused kernel's tile products, without its softmax
        _, NH, T, hs = q.shape
        for h in prange(NH):
            Q = q[0, h].copy()
            for i0 in range(0, T, block):
                i1 = min(i0 + block, T)
                for j0 in range(0, i1, block):
                    j1 = min(j0 + block, i1)
                    S = np.dot(Q[i0:i1], Q[j0:j1].T)
                    np.dot(S, Q[j0:j1])

    def tile_flops():                                # the same loops, counted
        return NH * sum(2 * 2 * (min(i0 + block, T) - i0) * (min(j0 + block, i0 + block, T) - j0) * hs
                        for i0 in range(0, T, block) for j0 in range(0, min(i0 + block, T), block))

    def weight(m):                                   # (in, out): a Linear's, or decode_layout's rows transposed
        return m.weight.data if hasattr(m, "weight") else m.packed.T

    def run():
        for layer, blk in enumerate(model.h):
            rows = T if layer < L - 1 else 1         # the last block: keys and values of all T, the rest on one row
            mm(act[C], weight(blk.attn.c_attn))
            if fused and rows == T:
                tiles(q, block)
                if counting:
                    count[0] += tile_flops()
            else:
                mm(mm(q[..., :rows, :], q.transpose(0, 1, 3, 2)), q)
            mm(act[C][:rows], weight(blk.attn.c_proj))
            mm(act[C][:rows], weight(blk.mlp.c_fc))
            mm(act[4 * C][:rows], weight(blk.mlp.c_proj))
        mm(act[C][:1], model.wte.weight.data.T)      # LM head, last position

    if fused:
        single_threaded_tile_blas()
    run()                                            # compiles the tiles and counts
    counting = False
    return run, count[0]


def npgpt_train(cfg, B, T, steps, replay=True):
    """The training loop's own step (npgpt.train.loop.train_step: forward, backward, gradient norm,
    AdamW with the clipping folded in), timed after two warm-up steps (kernel compile or cache load,
    then the allocator's first reuse of freed blocks); the peak RSS is taken then. With replay, the
    GEMM-only replay of the same step (gemm_replay) is built afterwards and `steps` more steps run
    alternating with it, so the two are compared under the same conditions (over_gemm)."""
    import numpy as np

    from .optim import AdamW
    from .train.lm import count_targets, lm_loss
    from .train.loop import train_step
    model = _npgpt_model(cfg)
    opt = AdamW(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(0)

    def step():
        idx = rng.integers(0, cfg["n_vocab"], (B, T))
        t0 = time.perf_counter()
        train_step(model, opt, (idx, np.roll(idx, -1, axis=1)), 1e-4, loss_fn=lm_loss, count_fn=count_targets,
                   clip=1.0)
        return time.perf_counter() - t0

    times = [step() for _ in range(steps + 2)][2:]
    out = {"seconds": _median(times), "all": times, "peak_rss_mb": _peak_rss_mb()}
    if replay:
        out.update(_against_replay(step, *gemm_replay(cfg, B, T), steps))
    return out


def _against_replay(timed, run_gemms, flops, n) -> dict:
    """`timed()` (returns its seconds) and the GEMM-only replay run_gemms() alternately, n times each
    after one replay to warm it: both under the same conditions, whatever the machine does meanwhile."""
    run_gemms()
    paired, gemm_times = [], []
    for _ in range(n):
        paired.append(timed())
        t0 = time.perf_counter()
        run_gemms()
        gemm_times.append(time.perf_counter() - t0)
    return dict(paired_seconds=_median(paired), gemm_seconds=_median(gemm_times), gemm_flops=flops,
                paired_all=paired, gemm_all=gemm_times, over_gemm=_median(paired) / _median(gemm_times))


def npgpt_train_loop(cfg, B, T, steps):
    """The same updates bare (train_step alone) and through the whole training loop (fit: data stream,
    schedule, progress bar), alternately, in one process: the loop's overhead over a bare step."""
    import numpy as np

    from .optim import AdamW
    from .train.data import BatchStream, Windows
    from .train.lm import count_targets, lm_loss
    from .train.loop import LoopConfig, fit, train_step
    model = _npgpt_model(cfg)
    opt = AdamW(model, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = np.random.default_rng(0).integers(0, cfg["n_vocab"], 64 * B * T + 1)
    stream = BatchStream(Windows(ids, T), B, shuffle=True, seed=0)
    loop = LoopConfig(steps=1, lr=1e-4)
    train_step(model, opt, stream.next(), 1e-4, loss_fn=lm_loss, count_fn=count_targets)   # warm-up
    bare, looped = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        train_step(model, opt, stream.next(), loop.lr_at(0), loss_fn=lm_loss, count_fn=count_targets)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fit(model, opt, stream, loop, loss_fn=lm_loss, count_fn=count_targets, progress=True)
        looped.append(time.perf_counter() - t0)
    t_bare, t_loop = sum(bare) / steps, sum(looped) / steps
    return {"seconds": t_loop, "bare_seconds": t_bare, "tokens_per_s": B * T / t_loop,
            "bare_tokens_per_s": B * T / t_bare, "overhead": t_loop / t_bare - 1.0}


def npgpt_train_ranks(cfg, B, T, steps, threads=None, overlap=(True,), shard=False) -> list | None:
    """The data-parallel train step, timed on a global batch of B x T: under mpiexec each rank computes
    its B / ranks rows (npgpt.train.loop.train_step with npgpt.distributed's dist), alone one process
    computes them all. `overlap` lists the distributed.OVERLAP settings the timed steps cycle through
    (`steps` of each after two warm-up steps; (True, False, False, True) alternates the two ABBA).
    Per setting, the median step time and the time allreduce_grads took inside the step: the
    communication left exposed after the backward, waiting for the slower ranks included (rank 0's,
    and each rank's); then the whole Allreduce timed alone after a barrier. shard: ZeRO-1
    (ShardedAdamW: a reduce-scatter in the backward, an all-gather of the parameters after the
    update, both counted as exposed). Returns one summary per distinct setting on rank 0, None on
    the others."""
    import numpy as np

    from . import distributed
    from .optim import AdamW, ShardedAdamW
    from .train.lm import count_targets, lm_loss
    from .train.loop import train_step
    d = distributed.init(threads)
    model = _npgpt_model(cfg)
    d.broadcast_parameters(model)
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = ShardedAdamW(model, d, **kw) if shard else AdamW(model, **kw)
    rng = np.random.default_rng(0)                 # the same global batches on every rank
    settings = list(dict.fromkeys(overlap))
    timed = {o: [] for o in settings}              # per setting: (step s, exposed s, buckets started in backward)
    before = distributed.OVERLAP
    try:
        for i in range(2 + steps * len(settings)):
            distributed.OVERLAP = overlap[(i - 2) % len(overlap)] if i >= 2 else overlap[0]
            idx = rng.integers(0, cfg["n_vocab"], (B, T))
            t0 = time.perf_counter()
            train_step(model, opt, (idx, np.roll(idx, -1, axis=1)), 1e-4, loss_fn=lm_loss, count_fn=count_targets,
                       clip=1.0, dist=d)
            if i >= 2:                             # the first steps compile and page-fault
                gathered = getattr(d, "allgather_seconds", 0.0) if shard else 0.0
                timed[distributed.OVERLAP].append((time.perf_counter() - t0,
                                                   getattr(d, "allreduce_seconds", 0.0) + gathered,
                                                   getattr(d, "overlapped_buckets", 0), gathered))
    finally:
        distributed.OVERLAP = before
    alone = []
    if d.world_size > 1:
        for _ in range(3):
            d.barrier()
            d.allreduce_grads(model)
            alone.append(d.allreduce_seconds)
    by_rank = d.gather({o: _median([t[1] for t in rows]) for o, rows in timed.items()})
    if not d.is_main:
        return None
    out = []
    for o, rows in timed.items():
        step, exposed = _median([t[0] for t in rows]), _median([t[1] for t in rows])
        out.append({"ranks": d.world_size, "threads": threads, "params": model.num_parameters(),
                    "overlap": o and d.world_size > 1, "shard_optimizer": shard, "seconds": step, "all": [t[0] for t in rows],
                    "tokens_per_s": B * T / step, "allreduce_in_step_s": exposed,
                    "allreduce_in_step_by_rank_s": [r[o] for r in by_rank], "exposed_pct": 100 * exposed / step,
                    "buckets_in_backward": max(t[2] for t in rows), "allgather_s": _median([t[3] for t in rows]),
                    "allreduce_alone_s": _median(alone) if alone else 0.0,
                    "bytes_per_rank_per_step": getattr(d, "bytes_per_step", 0), "peak_rss_mb": _peak_rss_mb()})
    return out


def _npgpt_inference_model(cfg, weights):
    """The model as `npgpt generate --weights` holds it: packed, or float32 laid out for decoding."""
    from .inference.quant import decode_layout, quantize
    return decode_layout(quantize(_npgpt_model(cfg).eval(), weights))


def npgpt_prefill(cfg, T, reps, weights="fp32", replay=True):
    """Prefill of T tokens into an empty KV cache, last-position logits (GPT.forward_cached). With
    replay (float32 weights only), its matrix products alone (prefill_gemm_replay) alternate with `reps`
    more prefills: over_gemm is the prefill / GEMM-only time under the same conditions."""
    import numpy as np

    from .inference.kvcache import KVCache
    model = _npgpt_inference_model(cfg, weights)
    idx = np.random.default_rng(0).integers(0, cfg["n_vocab"], (1, T))

    def prefill():
        cache = KVCache.for_model(model, 1)
        t0 = time.perf_counter()
        model.forward_cached(idx, cache)
        return time.perf_counter() - t0

    times = [prefill() for _ in range(reps + 1)][1:]
    out = {"tokens_per_s": T / _median(times), "seconds": _median(times)}
    out["peak_rss_mb"] = _peak_rss_mb()          # before the replay's own arrays
    if replay and weights == "fp32":            # the same products alone, alternating with more prefills
        out.update(_against_replay(prefill, *prefill_gemm_replay(model, T), reps))
    return out


def npgpt_decode(cfg, prompt, new, reps, weights="fp32", B=1):
    """Greedy decoding the way npgpt.inference.decode runs it (npgpt.inference.decode.Decoder: prefill, then one
    step per token); the time covers the `new` steps after the prefill."""
    import numpy as np

    from .inference.decode import Decoder
    from .inference.quant import weight_bytes
    model = _npgpt_inference_model(cfg, weights)
    idx = np.random.default_rng(0).integers(0, cfg["n_vocab"], (B, prompt))
    times = []
    for _ in range(reps + 1):
        dec = Decoder(model, B, prompt + new)
        logits = dec.prefill(list(idx))
        t0 = time.perf_counter()
        for _ in range(new):
            logits = dec.step(logits.argmax(-1))         # greedy
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": B * new / _median(times[1:]), "seconds": _median(times[1:]),
            "weights": weights, "weight_bytes": weight_bytes(model)}


def npgpt_startup(cfg):
    """Seconds from `npgpt generate` process start to its first token, weights local: Numba cache
    cold (empty cache dir) and warm (second run)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        from .io.pretrained import save_model
        save_model(_npgpt_model(cfg), model_dir)
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "numba-cache"))
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            # --no-echo: the first byte out is the first token's text (or, where that token is part of a
            # character, the line's end after it), not the prompt echoed before anything is computed
            proc = subprocess.Popen([sys.executable, "-m", "npgpt", "generate", "--model", model_dir, "-n", "1",
                                     "--temperature", "0", "--no-echo", "--stats", "!"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            first = proc.stdout.read(1)              # after the first generated token
            out[f"{label}_first_token_s"] = time.perf_counter() - t0
            _, err = proc.communicate()
            if proc.returncode != 0 or not first:    # a process that died is no start-up time
                raise RuntimeError(f"npgpt generate ({label} start) exited with {proc.returncode} before "
                                   f"its first token: {err.strip().splitlines()[-1] if err.strip() else 'no message'}")
    return out


# ----------------------------------------------------------------------------- torch workers
def _torch_model(cfg, train):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2Config(vocab_size=cfg["n_vocab"], n_positions=cfg["n_ctx"], n_embd=cfg["n_embd"],
                    n_head=cfg["n_head"], n_layer=cfg["n_layer"], resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, activation_function="gelu_new")
    model = GPT2LMHeadModel(hf)
    return model.train() if train else model.eval()


# DDP's reducer, when freed, joins gloo's worker thread while holding the GIL that thread may need to free
# its last work item: a deadlock (seen with torch 2.13, at random). The DDP worker keeps its model here
# and _worker ends that process without freeing anything once the report is out.
_KEEP_UNTIL_EXIT = []


def torch_adamw(model):
    """PyTorch's AdamW as npgpt's: decay on the >= 2-D parameters only."""
    import torch
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), eps=1e-8)


def torch_step(net, model, opt, idx):
    """One PyTorch train step on the token rows idx: forward, cross-entropy, backward, clipping, AdamW.
    net is model itself or its DDP wrapper. Returns the loss tensor."""
    import torch
    opt.zero_grad(set_to_none=True)
    logits = net(idx).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.roll(idx, -1, 1).view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def torch_train(cfg, B, T, steps, rank=0, world=1):
    """PyTorch's train step (forward, backward, clipping, AdamW) on a global batch of B x T, timed after
    two warm-up steps. With world > 1 this is rank `rank` of a DDP job over gloo (torch.distributed's
    env:// rendezvous: MASTER_ADDR, MASTER_PORT) and computes its B / world rows of every batch; DDP
    averages the ranks' gradients during the backward."""
    import torch
    model = _torch_model(cfg, train=True)
    net = model
    if world > 1:
        import torch.distributed as tdist
        tdist.init_process_group("gloo", rank=rank, world_size=world)
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch_adamw(model)
    g = torch.Generator().manual_seed(0)
    rows = slice(rank * B // world, (rank + 1) * B // world)      # this rank's contiguous rows
    times = []
    for s in range(steps + 2):                       # two warm-up steps, as npgpt's
        idx = torch.randint(0, cfg["n_vocab"], (B, T), generator=g)[rows]
        t0 = time.perf_counter()
        loss = torch_step(net, model, opt, idx)
        times.append(time.perf_counter() - t0)
    if world > 1:
        _KEEP_UNTIL_EXIT.append(net)                 # see _KEEP_UNTIL_EXIT
        if rank:
            return None                              # rank 0 reports
    return {"seconds": _median(times[2:]), "all": times[2:], "loss": loss.item(), "ranks": world}


def torch_prefill(cfg, T, reps):
    import torch
    model = _torch_model(cfg, train=False)
    idx = torch.randint(0, cfg["n_vocab"], (1, T), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(idx, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": T / _median(times[1:]), "seconds": _median(times[1:])}


def torch_decode(cfg, prompt, new, reps, B=1):
    import torch
    model = _torch_model(cfg, train=False)
    idx = torch.randint(0, cfg["n_vocab"], (B, prompt), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            out = model(idx, use_cache=True, logits_to_keep=1)
            past, logits = out.past_key_values, out.logits[:, -1]
            t0 = time.perf_counter()
            for _ in range(new):
                nxt = logits.argmax(-1, keepdim=True)
                out = model(nxt, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
            times.append(time.perf_counter() - t0)
    return {"tokens_per_s": B * new / _median(times[1:]), "seconds": _median(times[1:])}


# ----------------------------------------------------------------------------- driver
def _worker(argv):
    """python -m npgpt.bench FRAMEWORK WORKLOAD CFG_JSON OPTS_JSON -> one JSON line on stdout."""
    framework, workload, cfg, o = argv[0], argv[1], json.loads(argv[2]), json.loads(argv[3])
    rank = int(os.environ.get("RANK", 0))           # a torch DDP rank's (set by run_grid); MPI ranks ask MPI
    if framework == "npgpt":
        from .fast import settings
        settings.apply()                              # as the npgpt command does, before NumPy loads
    if framework == "torch":
        import torch
        torch.set_num_threads(o["threads"])
    t_import = time.perf_counter()
    fn = {("npgpt", "train"): lambda: npgpt_train(cfg, o["train_B"], o["train_T"], o["steps"]),
          ("npgpt", "train-large"): lambda: npgpt_train(cfg, o["train_large_B"], o["train_large_T"], o["steps"]),
          ("npgpt", "train-loop"): lambda: npgpt_train_loop(cfg, o["train_B"], o["train_T"], o["steps"]),
          ("npgpt", "prefill"): lambda: npgpt_prefill(cfg, o["prefill_T"], o["reps"], o.get("weights", "fp32")),
          ("npgpt", "decode"): lambda: npgpt_decode(cfg, o["decode_prompt"], o["decode_new"], o["reps"],
                                                    o.get("weights", "fp32"), o.get("decode_B", 1)),
          ("npgpt", "startup"): lambda: npgpt_startup(cfg),
          ("npgpt", "train-ranks"): lambda: npgpt_train_ranks(cfg, o["train_B"], o["train_T"], o["steps"], o["threads"],
                                                              shard=o.get("shard_optimizer", False)),
          ("torch", "train"): lambda: torch_train(cfg, o["train_B"], o["train_T"], o["steps"], rank, o.get("ranks", 1)),
          ("torch", "train-large"): lambda: torch_train(cfg, o["train_large_B"], o["train_large_T"], o["steps"]),
          ("torch", "prefill"): lambda: torch_prefill(cfg, o["prefill_T"], o["reps"]),
          ("torch", "decode"): lambda: torch_decode(cfg, o["decode_prompt"], o["decode_new"], o["reps"],
                                                    o.get("decode_B", 1))}[
        (framework, workload)]
    result = fn()
    if result is None:                                # a rank other than 0 of a data-parallel job
        _exit_if_kept()
        return
    if isinstance(result, list):                      # npgpt_train_ranks: one summary per OVERLAP setting
        result = result[0]
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    result["wall_s"] = time.perf_counter() - t_import
    if framework == "torch":
        import torch
        result["version"] = torch.__version__
    print(json.dumps(result), flush=True)
    _exit_if_kept()


def _exit_if_kept():
    """End a DDP worker without freeing its model (see _KEEP_UNTIL_EXIT)."""
    if _KEEP_UNTIL_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run_worker(framework, workload, cfg, opts):
    cmd = _worker_cmd(framework, workload, cfg, opts)
    env = _worker_env()
    env.setdefault("OMP_NUM_THREADS", str(opts["threads"]))
    env.setdefault("NUMBA_NUM_THREADS", str(opts["threads"]))
    if framework == "npgpt" and workload in ("prefill", "decode", "startup"):
        env.setdefault("GOMP_SPINCOUNT", INFERENCE_SPIN_COUNT)          # as `npgpt generate` runs
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", INFERENCE_BLAS_TIMEOUT)
    if framework == "npgpt" and opts.get("attention", "auto") != "auto":   # read by npgpt.fast.fused_attention
        env["NPGPT_FLASH_MIN_T"] = "0" if opts["attention"] == "fused" else str(1 << 30)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {framework}/{workload} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _worker_cmd(framework, workload, cfg, opts) -> list:
    """The worker's command line: PyTorch's runs in opts["torch_python"] (another environment may hold torch)."""
    python = (opts.get("torch_python") or sys.executable) if framework == "torch" else sys.executable
    return [python, "-m", "npgpt.bench", framework, workload, json.dumps(cfg), json.dumps(opts)]


def _worker_env() -> dict:
    """This environment, with npgpt importable from any Python (the torch worker's may be another venv's)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _torch_available(python=None) -> bool:
    """Whether `python` (default: this one) can import torch and transformers."""
    probe = "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('transformers')))"
    try:
        return subprocess.run([python or sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _config(args) -> dict:
    """Check the options and build the model shape here, so bad input fails before any worker starts."""
    from .config import SMALL_SHAPES, GPTConfig
    for k in ("threads", "steps", "reps", "rounds", "decode_batch", "prefill_T", "train_large_B", "train_large_T",
              "batch", "context", "timeout") + SHAPE:
        v = getattr(args, k, None)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.compare == "torch" and not _torch_available(getattr(args, "torch_python", None)):
        raise ValueError(f"--compare torch needs torch and transformers installed in "
                         f"{getattr(args, 'torch_python', None) or sys.executable} "
                         "(pip install torch==2.13.0 transformers, or --torch-python PYTHON of an environment that has them)")
    try:              # tiny and small: `npgpt train --config` bodies, with GPT-2's vocabulary and context
        cfg = (GPTConfig.from_preset("gpt2", **SMALL_SHAPES[args.model]) if args.model in SMALL_SHAPES
               else GPTConfig.from_preset(args.model)).to_hparams()
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    cfg.update({k: getattr(args, k) for k in SHAPE if getattr(args, k) is not None})
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"--n-embd {cfg['n_embd']} is not divisible by --n-head {cfg['n_head']}")
    if getattr(args, "grid", None) is not None:
        _check_grid(args, cfg)
    return GPTConfig(**cfg).to_hparams()


def run(args, cfg=None) -> dict:
    cfg = cfg or _config(args)
    opts = dict(DEFAULTS, threads=args.threads, steps=args.steps, reps=args.reps,
                weights=getattr(args, "weights", None) or "fp32", decode_B=getattr(args, "decode_batch", None) or 1,
                attention=getattr(args, "attention", None) or "auto", torch_python=getattr(args, "torch_python", None))
    for k in ("prefill_T", "train_large_B", "train_large_T"):
        if getattr(args, k, None) is not None:
            opts[k] = getattr(args, k)
    workloads = args.workloads or [w for w in WORKLOADS if w != "train-large"]
    compare = args.compare == "torch"
    report = {"config": cfg, "threads": args.threads, "blas": blas_info(), "int8_products": int8_products(),
              "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPGPT_KERNELS",
                                                     "NPGPT_FLASH_MIN_T", "NPGPT_PACKED_ROWS", "NPGPT_PREFETCH_ROWS")},
              "options": opts, "results": {}}
    rounds = report["rounds"] = getattr(args, "rounds", None) or 1
    for w in workloads:
        row = {"rounds": []}
        for r in range(rounds):               # npgpt, torch, npgpt, torch, ...: each pair in the same minutes
            pair = {"npgpt": _run_worker("npgpt", w, cfg, opts)}
            if compare and w not in ("startup", "train-loop"):
                pair["torch"] = _run_worker("torch", w, cfg, opts)
            row["rounds"].append(pair)
            if not args.json:
                _print_row(w, pair, opts, f" (round {r + 1}/{rounds})" if rounds > 1 else "")
        row.update(row["rounds"][0])          # the first round's figures, as with one round
        row.update(_round_medians(w, row["rounds"]))
        report["results"][w] = row
        if not args.json and rounds > 1 and ("median_ratio" in row or "median_over_gemm" in row):
            _print_medians(w, row)
    return report


def _round_ratio(w, pair):
    """The same-round ratio the row reports: speed npgpt/torch, or time npgpt/torch for train steps."""
    n, t = pair["npgpt"], pair.get("torch")
    if t is None:                          # no --compare, or a workload PyTorch does not run
        return None
    return n["seconds"] / t["seconds"] if w.startswith("train") else n["tokens_per_s"] / t["tokens_per_s"]


def _ceiling(pair):
    """PyTorch's prefill time over npgpt's GEMM-only replay of its prefill: the speed ratio npgpt would
    reach if everything but its matrix products took no time."""
    return pair["torch"]["seconds"] / pair["npgpt"]["gemm_seconds"]


def _round_medians(w, rounds) -> dict:
    out = {}
    ratios = [_round_ratio(w, p) for p in rounds]
    if ratios[0] is not None:
        out["ratios"], out["median_ratio"] = ratios, _median(ratios)
    over = [p["npgpt"]["over_gemm"] for p in rounds if "over_gemm" in p["npgpt"]]
    if over:
        out["over_gemm_all"], out["median_over_gemm"] = over, _median(over)
    if w == "prefill" and ratios[0] is not None and all("gemm_seconds" in p["npgpt"] for p in rounds):
        ceilings = [_ceiling(p) for p in rounds]
        out["ceilings"], out["median_ceiling"] = ceilings, _median(ceilings)
    return out


def _print_medians(w, row):
    parts = []
    if "median_ratio" in row:
        kind = "time ratio npgpt/torch" if w.startswith("train") else "speed ratio"
        parts.append(f"{kind} {row['median_ratio']:.2f}x (" + ", ".join(f"{r:.2f}" for r in row["ratios"]) + ")")
    if "median_over_gemm" in row:
        parts.append(f"{_what(w)} / GEMMs {row['median_over_gemm']:.2f}x ("
                     + ", ".join(f"{r:.2f}" for r in row["over_gemm_all"]) + ")")
    if "median_ceiling" in row:
        parts.append(f"torch / npgpt's GEMMs {row['median_ceiling']:.2f}x ("
                     + ", ".join(f"{r:.2f}" for r in row["ceilings"]) + ")")
    print(f"{'  median of ' + str(len(row['rounds'])) + ' rounds':<44} " + " | ".join(parts), flush=True)


def _what(w) -> str:
    return "prefill" if w == "prefill" else "step"


def _against_gemms(w, n) -> str:
    return (f" | {_what(w)} {n['paired_seconds']:.3f} s against its GEMMs alone {n['gemm_seconds']:.3f} s"
            f" ({n['gemm_flops'] / n['gemm_seconds'] / 1e9:.0f} GFLOP/s): {n['over_gemm']:.2f}x")


def _print_row(w, row, o, suffix=""):
    n, t = row["npgpt"], row.get("torch")
    if w == "train-loop":
        label = f"training loop B={o['train_B']} T={o['train_T']}"
        print(f"{label:<44} fit {n['tokens_per_s']:.0f} tok/s, "
              f"bare train step {n['bare_tokens_per_s']:.0f} tok/s: loop overhead {100 * n['overhead']:+.1f}%", flush=True)
        return
    if w == "startup":
        print(f"{'npgpt generate start to first token':<44} cold (no Numba cache) {n['cold_first_token_s']:.2f} s, "
              f"warm {n['warm_first_token_s']:.2f} s")
        return
    label = {"train": f"train step B={o['train_B']} T={o['train_T']}",
             "train-large": f"train step B={o['train_large_B']} T={o['train_large_T']}",
             "prefill": f"prefill B=1 T={o['prefill_T']}",
             "decode": f"decode B={o.get('decode_B', 1)} {o['decode_prompt']}-token prompt + {o['decode_new']} new"}[w]
    if w in ("prefill", "decode") and o.get("weights", "fp32") != "fp32":
        label += f" [{o['weights']}]"
    if o.get("attention", "auto") != "auto" and w != "decode":
        label += f" [{o['attention']}]"
    label += suffix
    if "seconds" in n and w.startswith("train"):
        line = f"{label:<44} npgpt {n['seconds']:.3f} s  peak {n['peak_rss_mb'] / 1024:.2f} GB"
        if t:
            line += (f" | torch {t['seconds']:.3f} s  peak {t['peak_rss_mb'] / 1024:.2f} GB"
                     f" | time ratio npgpt/torch {n['seconds'] / t['seconds']:.2f}x")
        if "gemm_seconds" in n:
            line += _against_gemms(w, n)
    else:
        line = f"{label:<44} npgpt {n['tokens_per_s']:.0f} tok/s"
        if t:
            line += f" | torch {t['tokens_per_s']:.0f} tok/s | speed ratio {n['tokens_per_s'] / t['tokens_per_s']:.2f}x"
        if "gemm_seconds" in n:
            line += _against_gemms(w, n)
            if t:
                line += f", torch / those GEMMs {_ceiling(row):.2f}x"
    print(line, flush=True)


# ----------------------------------------------------------------------------- ranks x threads
def cpu_model() -> str:
    """The CPU's model name as lscpu gives it (else /proc/cpuinfo's), for the reports' headers."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        lines = []
    if not lines and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("model name")), "unknown")


def find_mpiexec() -> str | None:
    """The mpiexec beside this Python (the mpich wheel puts it there; mpi4py binds to its MPI), else PATH's."""
    import shutil
    import sysconfig
    local = os.path.join(sysconfig.get_path("scripts"), "mpiexec")
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


def _have_mpi4py() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def parse_grid(text: str | None, cores: int) -> list:
    """'1x2,2x1' -> [(1, 2), (2, 1)], ranks x threads; 'auto' or None: every split of `cores` into
    ranks x threads == cores, one rank first."""
    if text in (None, "auto"):
        return [(r, cores // r) for r in range(1, cores + 1) if cores % r == 0]
    splits = []
    for part in text.split(","):
        try:
            r, t = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--grid: {part.strip()!r} is not RANKSxTHREADS (such as 2x4)") from None
        if r < 1 or t < 1:
            raise ValueError(f"--grid: {part.strip()!r}: ranks and threads must be >= 1")
        splits.append((r, t))
    return list(dict.fromkeys(splits))


def _check_grid(args, cfg):
    """--grid's splits against the batch, the context and what is installed, before anything runs."""
    from .fast.settings import cores
    if args.workloads:
        raise ValueError("--grid measures the train step over ranks x threads; leave out --workloads")
    splits = parse_grid(args.grid, cores())
    for r, t in splits:
        if args.batch % r:
            raise ValueError(f"--batch {args.batch} is not a multiple of the {r} ranks of --grid {r}x{t}")
    if args.context > cfg["n_ctx"]:
        raise ValueError(f"--context {args.context} is longer than the model's n_ctx {cfg['n_ctx']} (--n-ctx)")
    if any(r > 1 for r, _ in splits) and (find_mpiexec() is None or not _have_mpi4py()):
        raise ValueError("--grid with more than one rank runs npgpt under mpiexec, and mpiexec or mpi4py is not "
                         "installed (pip install -e \".[mpi]\")")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs, timeout: float) -> tuple:
    """Start every (cmd, env) of `jobs`, each in its own process group, and wait for them all, at most
    `timeout` seconds in all. When one fails, the others are ended; at the deadline all are (SIGTERM,
    which mpiexec forwards to its ranks, then SIGKILL): a hung MPI or gloo job never hangs the bench.
    Returns (status: 0, the first failure's exit status, or 124 at the deadline; the first job's
    stdout; every job's stderr)."""
    with contextlib.ExitStack() as stack:
        files = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2)] for _ in jobs]
        procs = []
        deadline = time.monotonic() + timeout
        stack.enter_context(signals.handling(("SIGTERM", "SIGHUP"), _end_the_wait))
        try:
            for (cmd, env), (out, err) in zip(jobs, files):
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True))
            while True:
                codes = [p.poll() for p in procs]
                status = next((c for c in codes if c), 0)
                if status or None not in codes:
                    break
                if time.monotonic() > deadline:
                    status = 124
                    break
                time.sleep(0.1)
            if status or any(p.poll() is None for p in procs):
                _end_groups(procs)
        except BaseException:                # Ctrl-C, SIGTERM: the jobs are in their own sessions, out of their reach
            with signals.handling(("SIGINT",), signal.SIG_IGN):   # one signal was enough: another must not cut
                _end_groups(procs)                                 # the ending short (SIGTERM, SIGHUP: see below)
            raise
        for p in procs:
            p.wait()
        for f in sum(files, []):
            f.seek(0)
        return status, files[0][0].read(), "".join(err.read() for _, err in files)


def _end_the_wait(signum, frame):
    """SIGTERM and SIGHUP (`timeout`, a batch system, a closed terminal) while the bench waits for its jobs:
    SystemExit(128 + the signal), as Ctrl-C raises KeyboardInterrupt, so that the jobs are ended on the way
    out instead of left running, orphaned, on the cores the next run is timed on. Both are ignored from
    then on (`timeout` signals the bench and then its group) until _launch puts the handlers back."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is _end_the_wait:
            signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def _end_groups(procs) -> None:
    """End every process of each Popen's group (start_new_session: the group id is the leader's pid; a
    job and all it started, mpiexec's ranks, a rank's children), whether or not the leader has already
    exited: SIGTERM, which mpiexec forwards, 5 s for the leaders to go, then SIGKILL to whatever is
    left, and at most 5 s until the groups are empty of live processes."""
    pgids = [p.pid for p in procs]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            for p in procs:
                p.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_group_left(g) for g in pgids):
        time.sleep(0.05)


def _group_left(pgid) -> bool:
    """Whether a live process (not a zombie waiting for its reaper) of group `pgid` still exists:
    from /proc's stat lines (state, field 3; group, field 5) where there is one, else kill(0)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()    # after "pid (name)": state, ppid, pgrp
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
    return False


def _run_split(framework, ranks, threads, cfg, opts, timeout) -> dict:
    """One run of the train step at ranks x threads: npgpt under `mpiexec -n ranks` (one plain process
    for 1), PyTorch as one process or `ranks` DDP processes over gloo on 127.0.0.1, each with `threads`
    threads. The worker's report (rank 0's), or {"error": ...}."""
    from .distributed import MPI_ENV
    o = dict(opts, threads=threads, ranks=ranks)
    env = {k: v for k, v in _worker_env().items() if k not in MPI_ENV}
    for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    if framework == "npgpt":
        cmd = _worker_cmd("npgpt", "train-ranks", cfg, o)
        if ranks > 1:
            cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
            env.setdefault("HYDRA_LAUNCHER", "fork")          # MPICH: every rank here, no ssh
        jobs = [(cmd, env)]
    else:
        cmd = _worker_cmd("torch", "train", cfg, o)
        rendezvous = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(ranks))
        jobs = [(cmd, dict(env, RANK=str(r), LOCAL_RANK=str(r), **rendezvous)) for r in range(ranks)]
    status, out, err = _launch(jobs, timeout)
    tail = " | ".join(err.strip().splitlines()[-3:])
    if status == 124:
        return {"error": f"timed out after {timeout:g} s (--timeout): {tail}"}
    if status:
        return {"error": f"exit status {status}: {tail}"}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no report: {tail}"}


def _ok(result) -> bool:
    return result is not None and "error" not in result


def _split_summary(rounds, tokens: int) -> dict:
    """Medians over a split's rounds that ran: each framework's step time and tokens/s, npgpt's
    Allreduce left exposed after the backward, and the median of the same-round speed ratios
    npgpt / PyTorch."""
    out = {}
    for fw in ("npgpt", "torch"):
        ran = [p[fw] for p in rounds if _ok(p.get(fw))]
        if ran:
            step = _median([r["seconds"] for r in ran])
            out[fw] = {"seconds": step, "tokens_per_s": tokens / step}
            if fw == "npgpt":
                exposed = _median([r["allreduce_in_step_s"] for r in ran])
                out[fw].update(allreduce_in_step_s=exposed, exposed_pct=100 * exposed / step)
    ratios = [p["torch"]["seconds"] / p["npgpt"]["seconds"] for p in rounds
              if _ok(p.get("npgpt")) and _ok(p.get("torch"))]
    if ratios:
        out["ratios"], out["median_ratio"] = ratios, _median(ratios)
    return out


def _best(rows) -> dict:
    """Each framework's fastest split (median tokens/s), and the one's speed over the other's."""
    best = {}
    for fw in ("npgpt", "torch"):
        ran = [r for r in rows if fw in r]
        if ran:
            b = max(ran, key=lambda r: r[fw]["tokens_per_s"])
            best[fw] = {"ranks": b["ranks"], "threads": b["threads"], "tokens_per_s": b[fw]["tokens_per_s"]}
    if len(best) == 2:
        best["ratio"] = best["npgpt"]["tokens_per_s"] / best["torch"]["tokens_per_s"]
    return best


def run_grid(args, cfg) -> dict:
    """The train step on a global batch of args.batch x args.context at every ranks x threads split of
    args.grid, npgpt's and (--compare torch) PyTorch's alternately, split after split, args.rounds times."""
    from .fast.settings import cores
    B, T, rounds = args.batch, args.context, args.rounds or 1
    compare = args.compare == "torch"
    opts = dict(train_B=B, train_T=T, steps=args.steps, torch_python=args.torch_python,
                shard_optimizer=getattr(args, "shard_optimizer", False))
    rows = [{"ranks": r, "threads": t, "rounds": []} for r, t in parse_grid(args.grid, cores())]
    for rnd in range(rounds):
        for row in rows:
            pair = {"npgpt": _run_split("npgpt", row["ranks"], row["threads"], cfg, opts, args.timeout)}
            if compare:
                pair["torch"] = _run_split("torch", row["ranks"], row["threads"], cfg, opts, args.timeout)
            row["rounds"].append(pair)
            if not args.json:
                print(_round_line(row, pair, B * T, f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""), flush=True)
    for row in rows:
        row.update(_split_summary(row["rounds"], B * T))
    report = {"cpu": cpu_model(), "cores": cores(), "blas": blas_info(), "config": cfg, "batch": B, "context": T,
              "steps": args.steps, "rounds": rounds, "compare": args.compare,
              "shard_optimizer": opts["shard_optimizer"],
              "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPGPT_KERNELS")},
              "grid": rows, "best": _best(rows)}
    if not args.json:
        print(grid_table(report), flush=True)
    return report


def _torch_kind(ranks: int) -> str:
    return "one process" if ranks == 1 else "DDP, gloo"


def _round_line(row, pair, tokens: int, suffix: str) -> str:
    """One run's figures, printed as it finishes."""
    def figures(r):
        return f"{r['seconds']:.3f} s {tokens / r['seconds']:.0f} tok/s" if _ok(r) else f"failed: {r['error']}"
    n, t = pair["npgpt"], pair.get("torch")
    line = f"{row['ranks']} x {row['threads']}{suffix}".ljust(22) + f" npgpt {figures(n)}"
    if _ok(n) and row["ranks"] > 1:
        line += f", {_exposed_what(n.get('shard_optimizer'))} {n['allreduce_in_step_s']:.3f} s ({n['exposed_pct']:.1f}%)"
    if t is not None:
        line += f" | PyTorch ({_torch_kind(row['ranks'])}) {figures(t)}"
        if _ok(n) and _ok(t):
            line += f" | npgpt / PyTorch {t['seconds'] / n['seconds']:.2f}x"
    return line


def _exposed_what(shard: bool) -> str:
    return "reduce-scatter and all-gather left exposed" if shard else "Allreduce left after the backward"


def grid_table(report) -> str:
    """The grid's medians as a Markdown table, and each framework's best split."""
    compare = report["compare"] == "torch"
    head = ["ranks x threads", "npgpt tok/s", "npgpt step", _exposed_what(report.get("shard_optimizer"))]
    if compare:
        head += ["PyTorch tok/s", "PyTorch step", "npgpt / PyTorch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["grid"]:
        n, t = row.get("npgpt"), row.get("torch")
        cells = [f"{row['ranks']} x {row['threads']}"]
        cells += ([f"{n['tokens_per_s']:.0f}", f"{n['seconds']:.3f} s",
                   f"{n['allreduce_in_step_s']:.3f} s ({n['exposed_pct']:.1f}%)" if row["ranks"] > 1 else ""]
                  if n else ["failed", "", ""])
        if compare:
            cells += ([f"{t['tokens_per_s']:.0f} ({_torch_kind(row['ranks'])})", f"{t['seconds']:.3f} s"]
                      if t else ["failed", ""])
            cells.append(f"{row['median_ratio']:.2f}x" if "median_ratio" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    best = report["best"]
    said = [f"best {name}: {b['ranks']} x {b['threads']}, {b['tokens_per_s']:.0f} tok/s"
            for name, b in (("npgpt", best.get("npgpt")), ("PyTorch", best.get("torch"))) if b]
    if "ratio" in best:
        said.append(f"npgpt's best / PyTorch's best {best['ratio']:.2f}x")
    return "\n".join(lines + ["; ".join(said)])


# ----------------------------------------------------------------------------- per-op timers
class OpClock:
    """Own wall time per op name for examples/profile_ops.py and profile_decode.py: a wrapped call's time
    minus that of the wrapped calls inside it, its call count, and (given weight_bytes(self_arg)) the bytes
    of weights it reads. Timing only while .on is set."""

    def __init__(self):
        from collections import defaultdict
        self.own, self.calls, self.bytes = defaultdict(float), defaultdict(int), defaultdict(int)
        self._inner = []            # per open call: time spent in timed calls inside it
        self.on = False

    def wrap(self, name, fn, weight_bytes=None):
        import functools

        @functools.wraps(fn)
        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            self._inner.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.own[name] += dt - self._inner.pop()
                self.calls[name] += 1
                if weight_bytes is not None:
                    self.bytes[name] += weight_bytes(a[0])
                if self._inner:
                    self._inner[-1] += dt
        return timed

    def clear(self):
        self.own.clear(), self.calls.clear(), self.bytes.clear()


if __name__ == "__main__":
    _worker(sys.argv[1:])
