"""Fine-tuning a pretrained GPT: a classification head (classifier.py, classify.py) and instruction following (instruct.py). LoRA's layer and surgery are in npgpt/layers/lora.py, its files in npgpt/io/peft.py.

The whole of `npgpt finetune classify` / `instruct` as one call (recipes.py; imported on first use, so
that `npgpt.Classifier` alone loads no training code):

    from npgpt.finetune import finetune_classify
    r = finetune_classify(data="SMSSpamCollection.tsv", init="gpt2", out="runs/spam", trainable_blocks=1)
"""
import importlib

_RECIPES = ("finetune_classify", "finetune_instruct", "ClassifyConfig", "InstructConfig")
__all__ = list(_RECIPES)


def __getattr__(name):
    if name in _RECIPES:
        value = getattr(importlib.import_module(".recipes", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
