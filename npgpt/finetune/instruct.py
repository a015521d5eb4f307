"""The instruction fine-tuning pieces `fit` is given (`npgpt finetune instruct`, the book's chapter 7):
Alpaca-style entries {instruction, input, output} as prompt + response token lists, padded batches
with masked targets, their evaluation, and greedy responses for a split.

The text of an entry (the Alpaca prompt format):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    ### Input:                 <- only when input is not empty
    {input}

    ### Response:
    {output}

A batch (`collate`): each entry's tokens, then one <|endoftext|> (50256), right-padded with 50256 to
the longest row (at most max_length + 1 tokens, truncating); inputs = ids[:, :-1], targets =
ids[:, 1:]. In the targets, every position after a row's first end token is -100 (ignored), so the
first end token stays a target (the model learns to stop) and padding never counts. With
mask_prompt, the targets that are prompt tokens are -100 too, so only the response (and its end
token) is learned.

The prompt and the response are encoded separately and concatenated, so the prompt's tokens are
exactly what generation and `npgpt chat` feed the model, and the response starts at a known token.
"""
from __future__ import annotations

import json

import numpy as np

from ..config import EOT_ID
from ..layers.module import no_grad
from ..loss import IGNORE_INDEX
from ..train.lm import mean_loss

END_ID = EOT_ID   # <|endoftext|>: the end of a response, and the padding
HEADER = ("Below is an instruction that describes a task. "
          "Write a response that appropriately completes the request.")
RESPONSE_MARK = "\n\n### Response:\n"
KEYS = ("instruction", "input", "output")


def format_prompt(entry: dict) -> str:
    """The prompt of an entry: header, instruction, input (if any) and the response heading, up to
    and including the newline after "### Response:"; the response follows it directly."""
    text = f"{HEADER}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text + RESPONSE_MARK


def format_entry(entry: dict) -> str:
    """The whole training text: prompt + output."""
    return format_prompt(entry) + entry["output"]


def check_entries(entries, where: str = "data") -> list:
    """entries unchanged if it is a list of {instruction, output[, input]} objects of strings, else a
    ValueError naming the first bad entry. "input" may be missing (read as "")."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected a JSON list of {{instruction, input, output}} objects, "
                         f"got a JSON {type(entries).__name__}")
    if not entries:
        raise ValueError(f"{where}: the list is empty")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise ValueError(f"{where}: entry {i} is a {type(e).__name__}, not an object")
        missing = [k for k in ("instruction", "output") if k not in e]
        if missing:
            raise ValueError(f"{where}: entry {i} has no {' and no '.join(repr(k) for k in missing)} key")
        for k in KEYS:
            if k in e and not isinstance(e[k], str):
                raise ValueError(f"{where}: entry {i}: {k!r} is a {type(e[k]).__name__}, not a string")
    return entries


def read_entries(path) -> list:
    """The entries of a JSON file (a list of {instruction, input, output}); ValueError on bad JSON
    or a bad entry, OSError if it cannot be read."""
    with open(path, encoding="utf-8") as f:
        try:
            entries = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_entries(entries, str(path))


def split_entries(entries: list, train: float = 0.85, test: float = 0.10) -> tuple:
    """(train, test, val), in file order as the book splits: the first 85%, the next 10%, the rest."""
    a = int(len(entries) * train)
    b = a + int(len(entries) * test)
    return entries[:a], entries[a:b], entries[b:]


def encode_entry(tokenizer, entry: dict) -> tuple:
    """(token ids of prompt + output, number of prompt tokens)."""
    prompt = tokenizer.encode(format_prompt(entry))
    return prompt + tokenizer.encode(entry["output"]), len(prompt)


def collate(seqs, prompt_lens=None, max_length: int | None = None, end_id: int = END_ID,
            ignore_index: int = IGNORE_INDEX) -> tuple:
    """Token lists -> (inputs, targets), both (B, T) int64, T = min(longest + 1, max_length) - see the
    module docstring. prompt_lens (one per row) also masks each row's prompt targets."""
    rows = [list(s) + [end_id] for s in seqs]
    T1 = max(len(r) for r in rows)                       # ids per row: inputs and targets are T1 - 1 long
    if max_length is not None:
        T1 = min(T1, max_length + 1)
    ids = np.full((len(rows), T1), end_id, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:T1]
        ids[i, :len(r)] = r
    x, y = ids[:, :-1].copy(), ids[:, 1:].copy()
    for i, s in enumerate(seqs):
        # row i's first end token is ids[i, len(s)], i.e. target y[i, len(s) - 1]: it stays; later ones go
        y[i, len(s):] = ignore_index
        if prompt_lens is not None:
            # y[i, j] is ids[i, j + 1]: the prompt's tokens ids[1 .. P-1] are targets 0 .. P-2
            y[i, :max(prompt_lens[i] - 1, 0)] = ignore_index
    return x, y


class InstructRows:
    """The training entries as BatchStream reads them: get(rows) -> (inputs, targets), padded and masked."""
    what = "entries"

    def __init__(self, seqs, prompt_lens, max_length=None, mask_prompt: bool = False):
        self.seqs, self.prompt_lens = list(seqs), list(prompt_lens)
        self.max_length, self.mask_prompt = max_length, mask_prompt

    def __len__(self):
        return len(self.seqs)

    def get(self, rows):
        return collate([self.seqs[i] for i in rows],
                       [self.prompt_lens[i] for i in rows] if self.mask_prompt else None, self.max_length)


def InstructBatches(seqs, prompt_lens, batch_size: int, max_length=None, mask_prompt: bool = False, seed: int = 0):
    """Shuffled (seeded) batches of (inputs, targets), reshuffled each epoch; the last partial batch of an
    epoch is dropped (as the book's training loader does), so every update has batch_size rows."""
    from ..train.data import BatchStream
    return BatchStream(InstructRows(seqs, prompt_lens, max_length, mask_prompt), batch_size, seed=seed)


def eval_batches(seqs, prompt_lens, batch_size: int, n_batches: int = 0, max_length=None,
                 mask_prompt: bool = False):
    """(inputs, targets) batches over the entries in order, the first n_batches of them (0: all)."""
    n = len(seqs) if not n_batches else min(len(seqs), n_batches * batch_size)
    for i in range(0, n, batch_size):
        yield collate(seqs[i:i + batch_size], prompt_lens[i:i + batch_size] if mask_prompt else None, max_length)


def instruct_evaluator(splits: dict, batch_size: int, n_batches: int = 0, max_length=None,
                       mask_prompt: bool = False):
    """evaluate(model) for fit: the mean loss over the (masked) targets of the first n_batches batches
    (0: all) of each split {name: (seqs, prompt_lens)}, as {name}_loss."""
    def evaluate(model):
        return {f"{name}_loss": mean_loss(model, eval_batches(seqs, plens, batch_size, n_batches, max_length,
                                                              mask_prompt))
                for name, (seqs, plens) in splits.items()}
    return evaluate


@no_grad()
def generate_responses(model, tokenizer, entries, max_new_tokens: int = 256, batch_size: int = 8,
                       end_id: int = END_ID, progress=None) -> list:
    """The model's response to each entry's prompt: greedy, up to max_new_tokens, ending at the
    end token; decoded and stripped of surrounding whitespace. Rows are decoded batch_size at a
    time (each row as it would be alone). progress(n_done) is called after each batch."""
    from ..inference.decode import generate
    out = []
    for i in range(0, len(entries), batch_size):
        prompts = [tokenizer.encode(format_prompt(e)) for e in entries[i:i + batch_size]]
        rows = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=end_id)
        for p, row in zip(prompts, rows):
            new = [int(t) for t in row[len(p):]]
            if end_id in new:
                new = new[:new.index(end_id)]
            out.append(tokenizer.decode(new).strip())
        if progress:
            progress(len(out))
    return out
