"""Evaluation the way papers and leaderboards measure a model (`npgpt eval`), checked against transformers.

    perplexity(model, text_or_ids, context=, stride=)   strided sliding windows, HF's perplexity guide
    lambada(model, texts)                               last-word accuracy (whole word; last BPE token), word ppl
    choice(model, items)                                multiple choice, HellaSwag's layout: acc, acc_norm, acc_mean
    classify(classifier, texts, labels)                 accuracy, per-class precision/recall/F1, confusion matrix

Each returns a dataclass (to_dict() for JSON). score.py holds what they share: batched log-likelihoods
of token sequences with nothing kept for backward, split over MPI ranks; data.py the named sets; resume.py
the finished batches (keep=True) an interrupted evaluation continues from.
"""
from .classify import ClassifyResult, classify
from .data import NAMED, ChoiceItem
from .perplexity import PerplexityResult, perplexity, windows
from .tasks import ChoiceResult, LambadaResult, choice, lambada

__all__ = ["perplexity", "windows", "lambada", "choice", "classify", "PerplexityResult", "LambadaResult",
           "ChoiceResult", "ClassifyResult", "ChoiceItem", "NAMED"]
