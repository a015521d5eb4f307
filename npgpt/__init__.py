"""npgpt: GPT-2 from scratch in NumPy, with every backward pass written by hand.

The public names below are imported on first use, so `import npgpt.layers` loads NumPy and the layers
and nothing else (no tokenizer, no Numba, no downloads), and the `npgpt` command can apply its process
settings (npgpt.fast.settings) before NumPy loads its BLAS.
"""
import importlib

__version__ = "0.1.0"

_API = {   # public name -> the module that defines it
    "GPTConfig": "config", "GPT": "model", "cross_entropy": "loss",
    "no_grad": "layers.module", "is_grad_enabled": "layers.module",
    "AdamW": "optim", "clip_grad_norm": "optim", "lr_schedule": "optim",
    "load_model": "io.pretrained", "save_model": "io.pretrained",
    "generate": "inference.decode", "generate_text": "inference.decode", "stream_tokens": "inference.decode",
    "stream_text": "inference.decode", "get_tokenizer": "tokens.bpe",
    "Classifier": "finetune.classifier", "gradcheck_layer": "gradcheck", "gradcheck_model": "gradcheck",
}
__all__ = list(_API)


def __getattr__(name):
    """A public name (imported from its module on first use), or a subpackage (npgpt.train, npgpt.io, ...)."""
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
