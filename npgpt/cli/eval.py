"""`npgpt eval`: measure a model the way papers and leaderboards do (npgpt.eval).

    npgpt eval --model gpt2 --data wikitext-2 --stride 512      # perplexity, the Hugging Face guide's windows
    npgpt eval --model gpt2 --data lambada                      # LAMBADA: last-word accuracy two ways, word ppl
    npgpt eval --model gpt2 --data hellaswag --limit 500        # multiple choice: acc, acc_norm, acc_mean
    npgpt eval --model runs/spam --task classify --data test.tsv
    npgpt eval --model runs/notes --data notes.txt --json eval.json

The task is --task, else the named set's (lambada, hellaswag), else perplexity. A table goes to stdout;
--json FILE writes the same figures with the settings. Under mpiexec each rank scores a share of the
windows or items and rank 0 reports. Bad input is one line (exit status 2). Interrupted (Ctrl-C, a kill),
the same command continues from the batches already scored (npgpt/eval/resume.py; --no-resume: not;
--task classify keeps nothing).
"""
from __future__ import annotations

import os
import sys

from . import CLIError, recipe_errors

TASKS = ("ppl", "lambada", "choice", "classify")


def add_parser(sub):
    p = sub.add_parser("eval", help="perplexity, LAMBADA, multiple choice or a classifier's metrics, as papers measure them",
                       description="Evaluate a model: perplexity of a text with strided sliding windows (Hugging Face's "
                                   "protocol), LAMBADA, HellaSwag-style multiple choice, or a fine-tuned classifier.")
    p.add_argument("--model", required=True, help="a model name (gpt2, ...), a checkpoint or a run directory")
    p.add_argument("--data", required=True,
                   help="a file, a directory of .txt files, a URL, or a name: wikitext-2, wikitext-103 (their test "
                        "splits), lambada, hellaswag (downloaded once), the-verdict, tinyshakespeare")
    p.add_argument("--task", choices=TASKS, default=None,
                   help="ppl (a text's perplexity), lambada (JSONL with text), choice (JSONL with ctx, endings, "
                        "label), classify (a TSV/CSV of label and text); default: the named set's, else ppl")
    p.add_argument("--context", type=int, default=None,
                   help="ppl: tokens per window (default the model's n_ctx; at most n_ctx + 1); classify: tokens "
                        "per row (default n_ctx)")
    p.add_argument("--stride", type=int, default=None, help="ppl: tokens between window starts (default: the context)")
    p.add_argument("--batch", type=int, default=8, help="windows or sequences per forward pass (default 8)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N windows or items")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8"], default=None,
                   help="pack the weights: bf16 or int8 (default: as the checkpoint stores them)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures and settings to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true",
                   help="score everything again: by default each finished batch is kept on disk and the same command "
                        "after an interruption (Ctrl-C, a kill) continues from them (not --task classify: one pass "
                        "a row)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from .. import distributed
    from ..eval import data
    task = args.task or data.default_task(args.data) or "ppl"
    _check_args(args, task)
    dist = distributed.init()
    progress = not args.no_progress
    with recipe_errors():
        if not dist.is_main:
            dist.barrier()                        # rank 0 downloads and caches the model and the data first
        evaluate, describe = _load(args, task, progress and dist.is_main)
        if dist.is_main and dist.world_size > 1:
            dist.barrier()
        options = dict(batch=args.batch, limit=args.limit, progress=progress, dist=dist)
        if task != "classify":                    # the language-model tasks keep their finished batches
            from ..eval import resume
            resume.prune()                        # on every rank: a cache may be on each node's own disk
            options["keep"] = not args.no_resume
        try:
            result = evaluate(options)
        except KeyboardInterrupt:
            if dist.is_main and options.get("keep"):
                again = "the same command" if dist.world_size == 1 else f"the same command with mpiexec -n {dist.world_size}"
                print(f"npgpt eval: the batches finished so far are kept; {again} continues from them",
                      file=sys.stderr, flush=True)
            raise
    described = describe(result)
    if dist.is_main:
        print(f"npgpt eval: {args.model} on {described}")
        print("\n".join(_table(task, result)))
        if args.json:
            from ..io.atomic import write_json
            settings = {k: getattr(args, k) for k in ("context", "stride", "batch", "limit", "weights")}
            with recipe_errors():
                write_json(args.json, {"model": args.model, "data": args.data, "task": task, "what": described,
                                       "settings": settings, "result": result.to_dict()})
    return 0


def _check_args(args, task):
    for flag, value, least in (("--batch", args.batch, 1), ("--limit", args.limit, 1), ("--context", args.context, 2),
                               ("--stride", args.stride, 1)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be >= {least}, got {value}")
    if task != "ppl" and args.stride is not None:
        raise CLIError(f"--stride is for perplexity (--task ppl), not --task {task}")
    if task in ("lambada", "choice") and args.context is not None:
        raise CLIError(f"--context is for --task ppl and classify; --task {task} reads up to the model's n_ctx")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise CLIError(f"--json {args.json}: no such directory")
    if not args.model.strip():
        raise CLIError("--model is empty: give a model name (gpt2, ...) or a checkpoint path")
    if _is_classifier(args.model) != (task == "classify"):
        if task == "classify":
            raise CLIError(f"--task classify needs a classifier (npgpt finetune classify); --model {args.model} is a "
                           f"language model")
        raise CLIError(f"--model {args.model} is a classifier (npgpt finetune classify): it labels texts and has no "
                       f"language-model head to score --task {task}; use --task classify with a labelled table")


def _is_classifier(path) -> bool:
    from ..finetune.classifier import LABELS_FILE
    from ..io import resolve_run_dir
    return os.path.isdir(path) and os.path.isfile(os.path.join(resolve_run_dir(path), LABELS_FILE))


def _load(args, task, progress):
    """Everything the task reads, loaded (downloaded and cached the first time) and checked:
    (run: options -> result, what is evaluated in words: result -> str)."""
    from .. import eval as ev
    from ..eval import data
    if task == "classify":
        from ..finetune.classifier import Classifier
        from ..finetune.classify import read_table
        try:
            model = Classifier.load(args.model, weights=args.weights)
        except (OSError, ValueError, KeyError) as e:
            raise CLIError(f"--model {args.model}: {e}") from None
        path = data.local_file(args.data, task, progress=progress)
        try:
            texts, labels = read_table(path)
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"--data {args.data}: {e}") from None
        return (lambda options: ev.classify(model, texts, labels, max_length=args.context, **options),
                lambda r: f"{args.data}: classification, {r.items:,} rows")
    from ..tokens.tokenizers import GPT2Tokenizer
    from .generate import _load_model, _tokenizer_for
    model = _load_model(args.model, args.weights)
    tokenizer = _tokenizer_for(args.model) or GPT2Tokenizer()
    if task == "ppl":
        from ..eval.perplexity import check_window
        from ..train.data import tokenize_cached
        context = args.context or model.config.n_ctx
        stride = args.stride or context
        check_window(context, stride, model.config.n_ctx, flag="--")
        text, described = data.load_text(args.data, progress=progress)
        ids = tokenize_cached(text, tokenizer)
        return (lambda options: ev.perplexity(model, ids, context, stride, tokenizer=tokenizer, **options),
                lambda r: f"{described}: perplexity, windows of {context} tokens every {stride} ({r.windows:,} windows)")
    rows = data.read_jsonl(data.local_file(args.data, task, progress=progress), task)
    if task == "lambada":
        return (lambda options: ev.lambada(model, rows, tokenizer, **options),
                lambda r: f"{args.data}: LAMBADA, {r.items:,} passages")
    return (lambda options: ev.choice(model, rows, tokenizer, **options),
            lambda r: f"{args.data}: multiple choice, {r.items:,} items")


def _table(task, r) -> list:
    """The result as aligned lines."""
    if task == "ppl":
        lines = [("tokens scored", f"{r.scored:,} of {r.tokens:,}"),
                 ("cross-entropy", f"{r.cross_entropy:.4f} nats/token"),
                 ("perplexity", f"{r.ppl:.4f}")]
        for name, value, unit, n in (("bits per byte", r.bits_per_byte, "bytes", r.bytes),
                                     ("bits per character", r.bits_per_char, "characters", r.chars),
                                     ("word perplexity", r.word_ppl, "words", r.words)):
            lines.append((name, "n/a (the tokens are not UTF-8 text)" if value is None else f"{value:.4f}  ({n:,} {unit})"))
    elif task == "lambada":
        lines = [("accuracy, whole last word", f"{r.acc:.4f}  (lm-evaluation-harness's acc)"),
                 ("accuracy, last BPE token", f"{r.acc_openai:.4f}  (OpenAI's)"),
                 ("perplexity of the last word", f"{r.ppl:.4f}  ({r.word_tokens:,} tokens)")]
    elif task == "choice":
        lines = [("acc", f"{r.acc:.4f}  (log-likelihood)"),
                 ("acc_norm", f"{r.acc_norm:.4f}  (per character, lm-evaluation-harness)"),
                 ("acc_mean", f"{r.acc_mean:.4f}  (per token, llm.c)")]
    else:
        width = max(len(name) for name in r.labels + ["class"])
        out = [f"  accuracy  {r.accuracy:.4f}  ({r.items:,} rows)", "",
               f"  {'class':<{width}}  precision  recall      f1  support"]
        support = [sum(row) for row in r.confusion]
        out += [f"  {name:<{width}}  {p:9.4f}  {rc:6.4f}  {f:6.4f}  {n:7,}"
                for name, p, rc, f, n in zip(r.labels, r.precision, r.recall, r.f1, support)]
        out += ["", "  confusion matrix (rows: true class, columns: predicted)",
                "  " + " " * width + "".join(f"  {name:>{max(len(name), 7)}}" for name in r.labels)]
        out += ["  " + f"{name:<{width}}" + "".join(f"  {c:>{max(len(m), 7)},}" for c, m in zip(row, r.labels))
                for name, row in zip(r.labels, r.confusion)]
        return out
    width = max(len(name) for name, _ in lines)
    return [f"  {name:<{width}}  {value}" for name, value in lines]
