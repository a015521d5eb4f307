"""Validation perplexity of a model trained with `npgpt train`, with float32, bf16 and int8 weights.

    python examples/quant_perplexity.py runs/shakespeare-char [--batch 32]

The run's own data settings (run.json: --data, --tokenizer, --context, --train-ratio) rebuild its
validation split; every window of it is evaluated (as --eval-batches 0 does).
"""
import argparse
import json
import math
import os


import npgpt
from npgpt.train import mean_loss, prepare_data
from npgpt.tokens.tokenizers import find_tokenizer

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("run")
p.add_argument("--batch", type=int, default=32)
args = p.parse_args()
npgpt.fast.settings.apply()

run = json.load(open(os.path.join(args.run, "run.json")))
tok = find_tokenizer(args.run)
data = prepare_data(run["data"], tokenizer=tok, context=run["context"], stride=run.get("stride"),
                    train_ratio=run["train_ratio"], progress=False)
print(f"{args.run}: {len(data.val)} validation windows of {data.context} tokens")
base = None
for weights in ("fp32", "bf16", "int8"):
    model = npgpt.load_model(args.run, weights=weights)
    loss = mean_loss(model, data.eval_batches("val", args.batch, 0))
    ppl = math.exp(loss)
    base = base or ppl
    print(f"{weights:>5}: val loss {loss:.5f}  perplexity {ppl:.4f}  change {100 * (ppl / base - 1):+.3f}%")
