"""nanoGPT's CPU run of shakespeare_char, in npgpt: a 4-layer, 128-wide character-level GPT on
tinyshakespeare (downloaded once into the cache, or a local copy given with --data).

    python examples/train_shakespeare_char.py [--data path/to/input.txt] [--out runs/shakespeare-char]

The same run from the command line:

    npgpt train --data tinyshakespeare --tokenizer char --config tiny --n-layer 4 --n-head 4 --n-embd 128 \\
        --context 64 --batch 12 --steps 2000 --lr 1e-3 --min-lr 1e-4 --warmup 100 --beta2 0.99 \\
        --dropout 0 --eval-every 250 --eval-batches 20 --out runs/shakespeare-char

nanoGPT's README trains this on a laptop CPU (block_size 64, batch 12, n_layer 4, n_head 4, n_embd
128, 2000 iterations, lr 1e-3 decayed to 1e-4, warmup 100, beta2 0.99, dropout 0) and reports a
validation loss of about 1.88. One difference: nanoGPT draws windows at random offsets; npgpt takes
the book's fixed windows (stride = context), reshuffled every epoch.
"""
import argparse

import numpy as np

import npgpt
from npgpt.train import LoopConfig, count_targets, fit, lm_evaluator, lm_loss, lm_sampler, prepare_data
from npgpt.tokens.tokenizers import tokenizer_files

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data", default="tinyshakespeare")
p.add_argument("--out", default="runs/shakespeare-char")
p.add_argument("--steps", type=int, default=2000)
args = p.parse_args()
npgpt.fast.settings.apply()

data = prepare_data(args.data, tokenizer="char", context=64)
config = npgpt.GPTConfig(n_vocab=data.n_vocab, n_ctx=64, n_embd=128, n_head=4, n_layer=4)
model = npgpt.GPT(config, dtype=np.float32, seed=0)
opt = npgpt.AdamW(model, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
loop = LoopConfig(steps=args.steps, lr=1e-3, min_lr=1e-4, warmup=100, clip=1.0, eval_every=250, sample_every=250)
result = fit(model, opt, data.batches(batch_size=12, seed=0), loop, loss_fn=lm_loss, count_fn=count_targets,
             evaluate=lm_evaluator(data, batch_size=12, n_batches=20),
             sample=lm_sampler(data.tokenizer, "ROMEO:", max_new_tokens=200, seed=0),
             run_dir=args.out, extra_files=tokenizer_files(data.tokenizer))   # `npgpt generate --model OUT` reads it
print(f"{result.step} steps; last evaluation {result.last_eval}")
