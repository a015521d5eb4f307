"""How much cheaper is a backward when only the last block (and ln_f, the head) trains?

A GPT-2 124M-shaped classifier (random weights), B=4, T=128: time Classifier.backward with every
parameter trainable, then with --trainable-blocks 1 (the frozen Linears skip their dL/dw GEMM, and
the 11 lower blocks and the embeddings are never visited).

    PYTHONPATH=. python examples/bench_frozen_backward.py [--repeats 5]
"""
import argparse
import time

import numpy as np

import npgpt


def time_backward(clf, ids, lengths, labels, repeats):
    times = []
    for _ in range(repeats + 1):                          # the first run warms up (JIT, page faults)
        clf.zero_grad()
        _, dlogits = npgpt.cross_entropy(clf(ids, lengths), labels)
        t0 = time.perf_counter()
        clf.backward(dlogits)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    args = ap.parse_args()
    clf = npgpt.Classifier(npgpt.GPT(npgpt.GPTConfig.from_preset("gpt2"), seed=0), ["a", "b"], seed=0).train()
    rng = np.random.default_rng(0)
    B, T = args.batch, args.context
    ids = rng.integers(0, 50257, (B, T))
    lengths = rng.integers(T // 2, T + 1, B)
    labels = rng.integers(0, 2, B)
    full = time_backward(clf.set_trainable(None), ids, lengths, labels, args.repeats)
    last = time_backward(clf.set_trainable(1), ids, lengths, labels, args.repeats)
    print(f"GPT-2 124M classifier backward, B={B}, T={T}, median of {args.repeats}:")
    print(f"  all parameters trainable : {full * 1e3:8.1f} ms")
    print(f"  last block + ln_f + head : {last * 1e3:8.1f} ms   ({full / last:.1f}x faster)")


if __name__ == "__main__":
    main()
