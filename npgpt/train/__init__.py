"""Training: data (text -> token windows -> batches), the one training loop, run checkpoints, metrics.

A loop of your own in a few lines:

    import npgpt
    from npgpt.train import LoopConfig, fit, lm_evaluator, lm_loss, count_targets, prepare_data

    data = npgpt.train.prepare_data("the-verdict", context=256)                  # or a path, URL, tinyshakespeare
    model = npgpt.GPT(npgpt.GPTConfig(n_vocab=data.n_vocab, n_ctx=256, n_embd=384, n_head=6, n_layer=6), seed=0)
    opt = npgpt.AdamW(model, lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fit(model, opt, data.batches(8, seed=0), LoopConfig(steps=100, lr=4e-4, eval_every=20),
        loss_fn=lm_loss, count_fn=count_targets, evaluate=lm_evaluator(data, 8, 5), run_dir="runs/verdict")

Or the whole of `npgpt train` as one call (npgpt/train/recipe.py; its settings are PretrainConfig's fields):

    r = npgpt.train.pretrain(data="the-verdict", config="tiny", context=64, steps=100, out="runs/verdict")
"""
from .data import BatchStream, Data, Windows, prepare_data
from .lm import count_targets, lm_evaluator, lm_loss, lm_sampler, mean_loss
from .loop import FitResult, LoopConfig, fit, split_rows, train_step
from .recipe import PretrainConfig, RunResult, pretrain
from .run import checkpoint_dir, plot_losses, read_metrics
from ..tokens.tokenizers import CharTokenizer, GPT2Tokenizer, load_tokenizer

__all__ = ["prepare_data", "Data", "Windows", "BatchStream", "fit", "train_step", "LoopConfig", "FitResult",
           "split_rows", "pretrain", "PretrainConfig", "RunResult", "lm_loss", "count_targets", "mean_loss",
           "lm_evaluator", "lm_sampler", "checkpoint_dir", "read_metrics", "plot_losses", "CharTokenizer", "GPT2Tokenizer", "load_tokenizer"]
