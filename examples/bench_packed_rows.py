"""Which way a CPU streams packed weights faster (issue 25): the one-row-of-x product of npgpt.fast.quant
(a decoded token's int8 or bf16 weights) with four weight rows side by side or one row at a time
(NPGPT_PACKED_ROWS=4 / 1; int8's product always takes one), each with and without asking for the rows
8 ahead (NPGPT_PREFETCH_ROWS=8 / 0), in GB/s of weights read, on weights already in cache (one matrix,
repeated) and on weights streamed from memory (as many copies as fill --stream-mb, as decoding reads
48 matrices and the LM head a token). The ways take turns, in a rotated order each round.

Since the sixth session (docs/performance.md) bf16's one-row product with one row at a time is few_rows' dot
products, which never prefetch: for bf16, "1 row, 8 ahead" and "1 row, no prefetch" now run the same code.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_packed_rows.py
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_packed_rows.py --shapes 50257x768 --rounds 4
"""
import argparse
import time

from npgpt.fast import settings

settings.apply(inference=True)   # as `npgpt generate` runs
import numpy as np  # noqa: E402

from npgpt.fast import quant  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", nargs="+", default=["3072x768", "768x3072", "50257x768"],
                help="OUTxIN weight shapes (GPT-2 124M: c_fc, c_proj, the LM head)")
ap.add_argument("--kinds", nargs="+", default=["int8", "bf16"], choices=["int8", "bf16"])
ap.add_argument("--stream-mb", type=float, default=200.0, help="weights a streamed pass reads")
ap.add_argument("--rounds", type=int, default=2)
args = ap.parse_args()


def packed(kind, O, K, rng):
    if kind == "int8":
        return rng.integers(-127, 128, (O, K)).astype(np.int8), np.ones(O, np.float32)
    return (rng.integers(0, 1 << 14, (O, K))).astype(np.uint16), None      # bf16 bits of modest floats


def rate(ws, scale, x, b, y, passes):
    """GB/s of weights read: the best of `passes` passes over the matrices ws."""
    quant.packed_matmul(x, ws[0], scale, b, out=y)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w in ws:
            quant.packed_matmul(x, w, scale, b, out=y)
        best = min(best, time.perf_counter() - t0)
    return sum(w.nbytes for w in ws) / best / 1e9


def main():
    rng = np.random.default_rng(0)
    print(f"CPU vendor {settings.cpu_vendor() or 'unknown'}; npgpt's choice: {quant.side_by_side()} row(s) at a time, "
          f"prefetch (rows ahead) for 768-byte / 1536-byte rows: {settings.prefetch_rows(768)} / {settings.prefetch_rows(1536)}")
    print("| weights | shape (out, in) | rows side by side | prefetch, rows ahead | in cache, GB/s | from memory, GB/s |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        O, K = (int(v) for v in shape.split("x"))
        for kind in args.kinds:
            w, scale = packed(kind, O, K, rng)
            copies = [w] + [w.copy() for _ in range(max(0, int(args.stream_mb * 1e6 // w.nbytes) - 1))]
            x = rng.standard_normal((1, K)).astype(np.float32)
            b = np.zeros(O, np.float32)
            y = np.empty((1, O), np.float32)
            ways = [(4, 8), (4, 0), (1, 8), (1, 0)] if kind == "bf16" else [(1, 8), (1, 0)]
            res = {way: [] for way in ways}
            for r in range(args.rounds):
                for way in ways[r % len(ways):] + ways[:r % len(ways)]:
                    quant._SIDE_BY_SIDE, quant._AHEAD = way
                    cached = rate([w] * max(1, len(copies)), scale, x, b, y, 3) if w.nbytes < 8e6 else float("nan")
                    res[way].append((cached, rate(copies, scale, x, b, y, 3)))
            for rows, ahead in ways:
                cached = max(c for c, _ in res[rows, ahead])
                streamed = max(s for _, s in res[rows, ahead])
                cached_s = "(too big)" if np.isnan(cached) else f"{cached:.1f}"
                print(f"| {kind} | ({O}, {K}) | {rows} | {ahead} | {cached_s} | {streamed:.1f} |")
    quant._SIDE_BY_SIDE = quant._AHEAD = None         # back to the CPU's choice


if __name__ == "__main__":
    main()
