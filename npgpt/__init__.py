"""npgpt: GPT-2 from scratch in NumPy, with every backward pass written by hand."""
import os

# OpenBLAS's idle threads spin for ~2^28 cycles after every GEMM, on the cores the Numba
# kernels between GEMMs need. A short spin (2^4 cycles) measured ~7% faster train steps and
# 2x faster softmax/cross-entropy kernels on 2 cores. OpenBLAS reads this when NumPy first loads
# it, so it only takes effect when npgpt is imported before NumPy (as the `npgpt` command does).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .classifier import Classifier
from .config import GPTConfig
from .generate import generate, generate_text, stream_text, stream_tokens
from .gradcheck import gradcheck_layer, gradcheck_model
from .layers.module import is_grad_enabled, no_grad
from .loss import cross_entropy
from .model import GPT
from .optim import AdamW, clip_grad_norm, lr_schedule
from .tokenizer import get_tokenizer
from . import runtime  # noqa: F401  (npgpt.runtime.keep_freed_memory())
from . import quant  # noqa: F401  (npgpt.quant.quantize(model, "int8"))
from . import lora  # noqa: F401  (npgpt.lora.apply_lora(model, rank=16, alpha=16))

__version__ = "0.1.0"
__all__ = ["GPTConfig", "GPT", "Classifier", "no_grad", "is_grad_enabled", "cross_entropy", "AdamW", "clip_grad_norm", "lr_schedule",
           "gradcheck_layer", "gradcheck_model",
           "generate", "generate_text", "stream_tokens", "stream_text", "get_tokenizer"]


def __getattr__(name):
    """npgpt.train is imported on first use (the generate command never pays for it)."""
    if name == "train":
        import importlib
        return importlib.import_module(".train", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
