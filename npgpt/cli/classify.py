"""`npgpt classify --model DIR "text"`: the label of a text, and its probability, from a fine-tuned classifier."""
from __future__ import annotations

from . import CLIError


def add_parser(sub):
    p = sub.add_parser("classify", help="classify a text with a fine-tuned classifier (npgpt finetune classify)")
    p.add_argument("--model", required=True, help="a fine-tuning run directory or a saved classifier")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default=None,
                   help="pack the transformer's weights: bf16 (2 bytes a weight) or int8 (1 byte, per-channel scales); "
                        "default: as the checkpoint stores them")
    p.add_argument("text", nargs="+", help="the text (several arguments are joined by spaces)")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..finetune.classifier import Classifier
    from ..layers.module import no_grad
    from ..tokens.bpe import get_tokenizer
    from ..finetune.classify import pad_batch
    try:
        model = Classifier.load(args.model, weights=args.weights)
    except (OSError, ValueError, KeyError) as e:
        raise CLIError(f"--model {args.model}: {e}") from None
    ids, lengths = pad_batch([get_tokenizer().encode(" ".join(args.text))], model.gpt.config.n_ctx)
    with no_grad():
        logits = model.forward(ids, lengths)[0].astype(np.float64)     # (K,)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    print(f"{model.labels[k]}\t{p[k]:.4f}")
    return 0
