"""Evaluation tokens/s at GPT-2 124M shapes (random weights), context 1024: npgpt.eval.perplexity against the
Hugging Face perplexity guide's loop in transformers, alternated in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_eval.py \\
        [--rounds 3] [--windows 4] [--stride 1024] [--batch 1] [--torch-python /work/venv-torch/bin/python]

Each round runs one npgpt worker (this Python) and one transformers worker (--torch-python: torch and
transformers, npgpt not needed), each its own process, in alternating order, both with --threads threads.
A worker builds GPT-2 124M with random weights, warms up on one 128-token window, then times the whole
evaluation of the same random token ids (numpy default_rng(0), windows x stride + context - stride tokens):
npgpt with --batch windows a forward; transformers with the guide's code (one window a forward, labels
masked with -100, outputs.loss). tokens/s = tokens scored / seconds; the ratio is npgpt's over transformers'
in the same round, and the median of the rounds is the figure.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from statistics import median

V, CONTEXT = 50257, 1024


def token_ids(args):
    import numpy as np
    n = args.windows * args.stride + CONTEXT - args.stride
    return np.random.default_rng(0).integers(0, V, n)


def npgpt_worker(args) -> dict:
    from npgpt.fast import settings
    settings.apply()                                                   # before NumPy loads, as the npgpt command
    settings.set_threads(args.threads)
    import npgpt
    from npgpt.eval import perplexity
    ids = token_ids(args)
    model = npgpt.GPT(npgpt.GPTConfig.from_preset("gpt2"), seed=0)
    perplexity(model, ids[:129], 129)                                  # loads the kernels
    t = time.perf_counter()
    r = perplexity(model, ids, CONTEXT, args.stride, batch=args.batch)
    seconds = time.perf_counter() - t
    from npgpt.bench import blas_info
    return {"scored": r.scored, "seconds": seconds, "ppl": r.ppl, "blas": blas_info()}


def torch_worker(args) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    encodings = torch.tensor(token_ids(args))[None]

    def guide(input_ids_all, max_length, stride):          # the guide's loop, as printed there
        seq_len = input_ids_all.size(1)
        nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
        for begin_loc in range(0, seq_len, stride):
            end_loc = min(begin_loc + max_length, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = input_ids_all[:, begin_loc:end_loc]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                neg_log_likelihood = model(input_ids, labels=target_ids).loss
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
            nll_sum += neg_log_likelihood * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
        return float(torch.exp(nll_sum / n_tokens)), n_tokens
    guide(encodings[:, :129], 129, 129)
    t = time.perf_counter()
    ppl, scored = guide(encodings, CONTEXT, args.stride)
    return {"scored": scored, "seconds": time.perf_counter() - t, "ppl": ppl, "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--stride", type=int, default=CONTEXT)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-python", default="/work/venv-torch/bin/python")
    p.add_argument("--worker", choices=["npgpt", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps((npgpt_worker if args.worker == "npgpt" else torch_worker)(args)))
        return
    flags = [f"--{k}={getattr(args, k)}" for k in ("windows", "stride", "batch", "threads")]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=root)
    ratios = []
    for r in range(args.rounds):
        got = {}
        for worker in (["npgpt", "torch"] if r % 2 == 0 else ["torch", "npgpt"]):
            python = sys.executable if worker == "npgpt" else args.torch_python
            out = subprocess.run([python, os.path.abspath(__file__), "--worker", worker, *flags], env=env, check=True,
                                 capture_output=True, text=True).stdout
            got[worker] = json.loads(out.strip().splitlines()[-1])
            w = got[worker]
            print(f"{time.strftime('%H:%M:%S')} round {r + 1} {worker:>5}: {w['scored']} tokens in {w['seconds']:.2f} s, "
                  f"{w['scored'] / w['seconds']:.1f} tok/s, ppl {w['ppl']:.1f}", flush=True)
        ratios.append((got["npgpt"]["scored"] / got["npgpt"]["seconds"]) / (got["torch"]["scored"] / got["torch"]["seconds"]))
        print(f"round {r + 1}: npgpt / transformers tokens/s {ratios[-1]:.2f}x", flush=True)
    print(f"blas: {got['npgpt']['blas']}; torch {got['torch']['torch']}")
    print(f"median of {args.rounds} rounds: npgpt {median(ratios):.2f}x transformers' tokens/s "
          f"(spread {min(ratios):.2f}-{max(ratios):.2f}x); context {CONTEXT}, stride {args.stride}, npgpt batch {args.batch}")


if __name__ == "__main__":
    main()
