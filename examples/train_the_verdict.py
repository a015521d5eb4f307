"""The chapter-5 run of "Build a Large Language Model (From Scratch)": GPT-2 124M from random weights
on the-verdict (bundled with npgpt), as the book trains it.

    python examples/train_the_verdict.py [--out runs/the-verdict-book]

The same run from the command line:

    npgpt train --data the-verdict --config gpt2 --context 256 --batch 2 --epochs 10 --lr 4e-4 \\
        --min-lr 4e-4 --beta2 0.999 --weight-decay 0.1 --dropout 0.1 --clip 0 --eval-every 5 \\
        --eval-batches 5 --sample-every 9 --save-every 0 --prompt "Every effort moves you" --seed 123 \\
        --out runs/the-verdict-book

The book: context 256, batch 2 (last partial batch dropped, shuffled), AdamW lr 4e-4 constant,
weight decay 0.1, betas (0.9, 0.999), dropout 0.1, no gradient clipping, 10 epochs, evaluation
every 5 steps over 5 batches. It prints train 9.78 / val 9.93 at its first evaluation and 0.39 / 6.45
at step 85: the model memorises the 20 KB story (validation loss stops falling after a few epochs).
One difference: the book's model has no bias on the q, k, v projection; GPT-2's (and npgpt's) has.
"""
import argparse

import numpy as np

import npgpt
from npgpt.train import LoopConfig, count_targets, fit, lm_evaluator, lm_loss, lm_sampler, prepare_data
from npgpt.tokens.tokenizers import tokenizer_files

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", default="runs/the-verdict-book")
p.add_argument("--epochs", type=int, default=10)
args = p.parse_args()
npgpt.fast.settings.apply()

data = prepare_data("the-verdict", tokenizer="gpt2", context=256)             # 90/10 split by characters
config = npgpt.GPTConfig.from_preset("gpt2", n_ctx=256, dropout=0.1)
model = npgpt.GPT(config, dtype=np.float32, seed=123)
opt = npgpt.AdamW(model, lr=4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
batches = data.batches(batch_size=2, shuffle=True, seed=123)
steps = args.epochs * batches.batches_per_epoch
loop = LoopConfig(steps=steps, lr=4e-4, min_lr=4e-4, warmup=0, clip=0.0,   # constant lr, no clipping
                  eval_every=5, sample_every=batches.batches_per_epoch, save_every=0)
result = fit(model, opt, batches, loop, loss_fn=lm_loss, count_fn=count_targets,
             evaluate=lm_evaluator(data, batch_size=2, n_batches=5),
             sample=lm_sampler(data.tokenizer, "Every effort moves you", max_new_tokens=25, seed=123),
             run_dir=args.out, extra_files=tokenizer_files(data.tokenizer))   # `npgpt generate --model OUT` reads it
print(f"{result.step} steps; last evaluation {result.last_eval}; curve in {args.out}/loss.png")
