"""Zero-shot tasks scored from log-likelihoods: LAMBADA's last word and HellaSwag-style multiple choice.

LAMBADA (Paperno et al. 2016; OpenAI's detokenized test set): predict a passage's last word.
    context, word = text.rsplit(" ", 1); the target is " " + word, split into tokens as
    lm-evaluation-harness does (encode_pair). Per passage, with its model input cut to the last
    n_ctx + 1 tokens as the harness cuts it:
    acc          every token of the word is the greedy (argmax) prediction    (the harness's lambada_openai acc)
    acc_openai   the text's last BPE token is the greedy prediction given all tokens before it
                 (the accuracy OpenAI's GPT-2 evaluation and Megatron's non-strict LAMBADA report)
    ppl          exp(-mean over passages of log p(word | context)), a per-word perplexity (the harness's)

Multiple choice (HellaSwag's layout {ctx, endings, label}): each ending is scored as the continuation
" " + ending of ctx, tokens encode(ctx) + encode(" " + ending), as llm.c's dev/data/hellaswag.py does.
With ll = log p(ending | ctx), the predicted ending is
    acc          argmax ll                          lm-evaluation-harness's acc
    acc_norm     argmax ll / len(ending)            its acc_norm (len of the ending string, its code's
                                                    "byte-length" normalisation; characters = bytes in ASCII)
    acc_mean     argmax ll / tokens of the ending   llm.c's (the lowest mean loss per token)
ties go to the first ending, as np.argmax and torch.argmax break them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .perplexity import check_vocab, default_tokenizer
from .score import Request, score


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """lm-evaluation-harness's tokens of a context and its continuation: the context's trailing spaces move to
    the continuation, and the continuation's tokens are what encoding both together adds after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def continuation_request(ctx, cont, n_ctx: int) -> Request:
    """The model input ctx + cont cut to its last n_ctx + 1 tokens, scoring cont (as the harness cuts it)."""
    if not 1 <= len(cont) <= n_ctx:
        raise ValueError(f"a continuation of {len(cont)} tokens cannot be scored with n_ctx = {n_ctx}")
    ids = np.asarray(list(ctx) + list(cont), dtype=np.int64)[-(n_ctx + 1):]
    return Request(ids, max(len(ids) - len(cont), 1))


@dataclass
class LambadaResult:
    """Last-word accuracy two ways and the word's perplexity over `items` passages."""
    items: int
    acc: float                    # the whole last word greedy
    acc_openai: float             # its last BPE token greedy
    ppl: float                    # exp(-mean log p(word | context))
    word_tokens: int              # tokens of the target words, all passages
    logliks: list = field(repr=False)   # log p(word | context) of each passage

    def to_dict(self) -> dict:
        return asdict(self)


def lambada(model, texts, tokenizer=None, *, batch: int = 8, limit: int | None = None, progress: bool = False,
            dist=None, keep: bool = False) -> LambadaResult:
    """LAMBADA on passages `texts` (see the module docstring); tokenizer: default GPT-2's BPE."""
    tokenizer = default_tokenizer(tokenizer)
    n_ctx = model.config.n_ctx
    texts = list(texts)[:limit]
    requests, where = [], []                  # where[i] = (word request, last-token request, its index) of text i
    for text in texts:
        context, word = text.rsplit(" ", 1)
        word_req = continuation_request(*encode_pair(tokenizer, context, " " + word), n_ctx)
        ids = tokenizer.encode(text)
        last_req = continuation_request(ids[:-1], ids[-1:], n_ctx)
        same = np.array_equal(word_req.ids, last_req.ids)        # one forward serves both (nearly always)
        where.append((len(requests), len(requests) + (not same)))
        requests += [word_req] if same else [word_req, last_req]
    for r in requests:
        check_vocab(r.ids, model.config.n_vocab)
    scores = score(model, requests, batch, progress, dist, desc="lambada", keep=keep)
    logliks = [-float(scores[w].nll.sum()) for w, _ in where]
    acc = np.mean([scores[w].greedy.all() for w, _ in where])
    acc_openai = np.mean([scores[last].greedy[-1] for _, last in where])
    return LambadaResult(len(texts), float(acc), float(acc_openai), math.exp(-float(np.mean(logliks))),
                         sum(len(scores[w].nll) for w, _ in where), logliks)


@dataclass
class ChoiceResult:
    """Multiple-choice accuracy three ways over `items` items."""
    items: int
    acc: float                    # argmax of the ending's log-likelihood
    acc_norm: float               # ... divided by its length in characters
    acc_mean: float               # ... divided by its tokens
    logliks: list = field(repr=False)   # each item's endings' log-likelihoods

    def to_dict(self) -> dict:
        return asdict(self)


def choice(model, items, tokenizer=None, *, batch: int = 8, limit: int | None = None, progress: bool = False,
           dist=None, keep: bool = False) -> ChoiceResult:
    """Multiple choice on ChoiceItems (npgpt.eval.data; HellaSwag's layout), see the module docstring."""
    tokenizer = default_tokenizer(tokenizer)
    n_ctx = model.config.n_ctx
    items = list(items)[:limit]
    requests = []
    for item in items:
        ctx = tokenizer.encode(item.ctx)
        requests += [continuation_request(ctx, tokenizer.encode(" " + e), n_ctx) for e in item.endings]
    for r in requests:
        check_vocab(r.ids, model.config.n_vocab)
    scores = iter(score(model, requests, batch, progress, dist, desc="choice", keep=keep))
    logliks, hits = [], np.zeros(3)
    for item in items:
        mine = [next(scores) for _ in item.endings]
        ll = np.array([-s.nll.sum() for s in mine])                              # (endings,)
        chars = np.array([len(e) for e in item.endings], dtype=np.float64)
        n_tokens = np.array([len(s.nll) for s in mine], dtype=np.float64)
        hits += [np.argmax(ll) == item.label, np.argmax(ll / chars) == item.label,
                 np.argmax(ll / n_tokens) == item.label]
        logliks.append(ll.tolist())
    acc, acc_norm, acc_mean = (hits / max(len(items), 1)).tolist()
    return ChoiceResult(len(items), acc, acc_norm, acc_mean, logliks)
