"""Where a decoded token's time goes (issue 25): GPT-2 124M shapes (random weights), B rows, one token a
step after a prompt, each op's own time per token, and the bytes the weight products read against the
machine's memory bandwidth.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/profile_decode.py [--weights fp32 bf16 int8] \\
        [--B 1] [--prompt 32] [--new 128] [--rounds 3]

Ops are timed as profile_ops.py times them (a call's own time: its wall time minus the timed calls
inside it): each Linear / QuantLinear (the matrix-vector products of the blocks), the LM head, the
embedding lookups, LayerNorm, GELU, the attention layer's own work over the cache (the split into heads,
q k^T, the probabilities' product with V), every Numba kernel, and "Python between them" (the token's
wall time minus every op's). For the weight products the table gives GB/s: the bytes of their weights,
biases and scales read once a token, over their time.

The bandwidth line is NumPy's float32 matrix-vector product over a 256 MiB matrix on the same threads
(what a memory-bound product can read here), measured in every round right after that round's decode,
since this rate moves by a quarter within minutes on a shared machine. The floor is every byte a token
must read (the weights of the blocks and the LM head, and the keys and values of the KV cache: 2 x
n_layer x B x C x 4 bytes for each cached position, 74 KB a position at B=1 for GPT-2 124M, 7 MB a
token averaged over a 32-token prompt and 128 new tokens; the embedding rows are a few KB) over that
round's bandwidth; "bare / floor" is the median over rounds of each round's ratio. The decode itself is
also timed without the timers ("bare") in the same rounds.

The model is held as `npgpt generate` holds it (float32: rows, npgpt.inference.quant.decode_layout), and
`npgpt generate` runs each block of a decoded token as one compiled call
(npgpt/inference/fused.py), which leaves nothing for the timers to see inside a block: the table is
taken through the model's modules (the reference path, the same values), and the bare times are given
both ways, the compiled blocks' ("bare") and the modules' ("bare through the modules").
"""
import argparse
import time
from collections import defaultdict

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
ap.add_argument("--B", type=int, default=1)
ap.add_argument("--prompt", type=int, default=32)
ap.add_argument("--new", type=int, default=128)
ap.add_argument("--rounds", type=int, default=3)
args = ap.parse_args()

from npgpt.fast import settings  # noqa: E402
settings.apply(inference=True)   # as `npgpt generate` runs: before NumPy loads OpenBLAS
import numpy as np  # noqa: E402

import npgpt  # noqa: E402
from npgpt import fast, layers  # noqa: E402
from npgpt.bench import OpClock, blas_info, cpu_model  # noqa: E402
from npgpt.inference import quant  # noqa: E402
from npgpt.inference import fused  # noqa: E402
from npgpt.inference.decode import Decoder  # noqa: E402


class DecodeClock(OpClock):
    """npgpt.bench.OpClock over a decoded token's ops, with the bytes the weight products read."""

    def instrument(self):
        def linear_bytes(m):
            return m.weight.data.nbytes + m.bias.data.nbytes

        def quant_bytes(m):
            return m.packed.nbytes + (m.scale.nbytes if m.scale is not None else 0) + m.bias.data.nbytes

        def head_bytes(m):
            return m.weight.data.nbytes

        def quant_head_bytes(m):
            return m.packed.nbytes + (m.scale.nbytes if m.scale is not None else 0)
        # Linear.forward is forward_without_bias (the product) and the bias add; the MLP's c_fc calls the
        # former alone and adds its bias in GELU's pass. The product's row counts the bias's bytes too.
        products = {(layers.Linear, "forward_without_bias"): ("matrix-vector products (Linear)", linear_bytes),
                    (quant.QuantLinear, "forward"): ("matrix-vector products (QuantLinear)", quant_bytes),
                    (layers.TiedLMHead, "forward"): ("LM head (50,257 rows)", head_bytes),
                    (quant.QuantTiedLMHead, "forward"): ("LM head (50,257 rows)", quant_head_bytes)}
        for (cls, meth), (name, nbytes) in products.items():
            setattr(cls, meth, self.wrap(name, vars(cls)[meth], nbytes))
        others = {(layers.Embedding, "forward"): "embedding lookup", (quant.QuantEmbedding, "forward"): "embedding lookup",
                  (layers.PositionEmbedding, "forward_cached"): "embedding lookup",
                  (layers.Linear, "forward"): "bias add (Linear)",
                  (layers.LayerNorm, "forward"): "LayerNorm", (layers.GELU, "forward"): "GELU",
                  (layers.CausalSelfAttention, "forward_cached"): "attention over the cache (own work)",
                  (layers.Block, "forward_cached"): "block (residual adds)", (layers.MLP, "forward"): "MLP (own)",
                  (npgpt.GPT, "forward_cached"): "GPT.forward_cached (own)",
                  (Decoder, "step"): "Decoder.step (own)"}
        for (cls, meth), name in others.items():
            setattr(cls, meth, self.wrap(name, vars(cls)[meth]))
        for name in fast._KERNELS:
            if not name.startswith("few_rows_matmul"):  # the products themselves: counted in their modules' rows
                setattr(fast, name, self.wrap(f"kernel {name}", getattr(fast, name)))


_GEMV = []


def bandwidth(reps=10) -> float:
    """GB/s NumPy's float32 matrix-vector product reads from a 256 MiB matrix (median of reps)."""
    if not _GEMV:
        _GEMV.append(np.random.default_rng(0).standard_normal((8192, 8192), dtype=np.float32))
    w = _GEMV[0]
    x = np.ones(8192, np.float32)
    w @ x
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        w @ x
        ts.append(time.perf_counter() - t)
    return w.nbytes / float(np.median(ts)) / 1e9


def main():
    print(f"CPU: {cpu_model()}; BLAS: {blas_info()}; GPT-2 124M shapes, B={args.B}, prompt {args.prompt}, "
          f"{args.new} new tokens; {args.rounds} rounds", flush=True)
    clock = DecodeClock()
    clock.instrument()
    cfg = npgpt.GPTConfig.from_preset("gpt2")
    base = npgpt.GPT(cfg, dtype=np.float32, seed=0).eval()
    float_weights = {k: v.copy() for k, v in base.state_dict().items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.n_vocab, (args.B, args.prompt))

    def decode(model, timed, compiled=True):
        """Prefill untimed, then args.new tokens one step at a time -> seconds per step. compiled=False: the
        blocks through the model's modules, as GPT.forward_cached runs them."""
        dec = Decoder(model, args.B, args.prompt + args.new, compiled=compiled)   # as npgpt generate decodes
        logits = dec.prefill(list(prompt))
        clock.on = timed
        t = time.perf_counter()
        for _ in range(args.new):
            logits = dec.step(logits.argmax(-1))
        dt = time.perf_counter() - t
        clock.on = False
        return dt / args.new

    # a token reads every cached key and value and its own: on average over the new tokens,
    # prompt + (new + 1) / 2 positions of 2 x n_layer x B x C values of the cache (float32)
    kv_bytes = 2 * cfg.n_layer * args.B * cfg.n_embd * np.dtype(np.float32).itemsize * (args.prompt + (args.new + 1) / 2)
    for kind in args.weights:
        model = npgpt.GPT(cfg, dtype=np.float32, seed=0)
        model.load_state_dict(float_weights)
        model = quant.decode_layout(quant.quantize(model.eval(), kind))     # as npgpt generate holds it
        decode(model, False)                                  # compile, fault the pages in
        fusable = fused.plan(model) is not None                 # each block one call a token
        own, bare, bare_modules, wall, calls, gbs = defaultdict(list), [], [], [], {}, []
        for _ in range(args.rounds):
            bare.append(decode(model, False))
            gbs.append(bandwidth())                             # the memory's rate now, beside this decode
            if fusable:
                bare_modules.append(decode(model, False, compiled=False))
            clock.clear()
            wall.append(decode(model, True, compiled=False))
            timed = 0.0
            for name, s in clock.own.items():
                own[name].append(s / args.new)
                timed += s / args.new
            own["Python between them"].append(wall[-1] - timed)
            calls = {k: v / args.new for k, v in clock.calls.items()}
            nbytes = {k: v / args.new for k, v in clock.bytes.items()}
        med = {k: float(np.median(v)) for k, v in own.items()}
        step, step_bare = float(np.median(wall)), float(np.median(bare))
        weight_bytes = sum(nbytes.values())
        total_bytes = weight_bytes + kv_bytes
        floors = [total_bytes / (g * 1e9) for g in gbs]                # each round's floor at its own rate
        over = sorted(b / f for b, f in zip(bare, floors))
        modules = f", {np.median(bare_modules) * 1e3:.2f} ms bare through the modules" if fusable else ""
        print(f"### {kind}: {step_bare * 1e3:.2f} ms a token bare ({args.B / step_bare:.1f} tok/s){modules}, "
              f"{step * 1e3:.2f} ms timed (the table: through the modules); a token reads {total_bytes / 1e6:.1f} MB "
              f"(weights {weight_bytes / 1e6:.1f}, KV cache {kv_bytes / 1e6:.1f}); NumPy's GEMV read "
              f"{', '.join(f'{g:.1f}' for g in gbs)} GB/s in the rounds, floor {np.median(floors) * 1e3:.2f} ms: "
              f"bare / floor {np.median(over):.2f}x ({over[0]:.2f}-{over[-1]:.2f}, a ratio a round)")
        print("| op | calls a token | ms a token | share | GB/s |")
        print("|---|---:|---:|---:|---:|")
        for name in sorted(med, key=lambda k: -med[k]):
            if med[name] < 0.005e-3:
                continue
            rate = f"{nbytes[name] / med[name] / 1e9:.1f}" if name in nbytes and med[name] > 0 else ""
            print(f"| {name} | {calls.get(name, 0):.0f} | {med[name] * 1e3:.3f} | {med[name] / step:.1%} | {rate} |")
        print(flush=True)


if __name__ == "__main__":
    main()
