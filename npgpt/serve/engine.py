"""The engine: one model, a KV cache of `parallel` rows, and a thread that decodes every running
sequence together (continuous batching).

    engine = Engine(model, tokenizer, parallel=4).start()
    seq = Sequence(prompt_ids, Params(max_tokens=32, temperature=0.0), emit=print)
    engine.submit([seq])             # from any thread; emit(Event) is called from the engine's thread
    engine.cancel([seq])             # e.g. the client went away: its row is freed before the next step

The engine's loop, one iteration at a time:

    1. forget cancelled sequences (waiting or running: a running one's row is free again);
    2. admit waiting sequences, first come first served, into free rows: each is prefilled alone into
       its own row (GPT.forward_cached on that row, exactly `npgpt generate`'s prefill), and its first
       token is drawn from the prefill's logits;
    3. one batched step (npgpt/serve/batched.py) feeds every running sequence its last token, each at
       its own position in its own row; each row's logits go to that sequence's own Sampler (its own
       seed, penalties and history) and its TextStreamer (UTF-8 and stop strings);
    4. a sequence that drew <|endoftext|>, completed a stop string or reached max_tokens reports its
       finish reason and leaves its row, which the next iteration's step 2 refills.

No row waits for another: a finished row is refilled while the others go on, and the batched step
is batch-invariant, so every sequence gets the tokens it would get alone. Nothing is shared between
sequences but the model and the cache's memory. A failure inside one sequence (NaN logits, say)
ends that sequence with an error event; one in the batched step ends the sequences of that step;
the loop itself goes on.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import threading
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..inference.decode import TextStreamer
from ..inference.kvcache import KVCache
from ..inference.sampling import Sampler, TokenHistory, top_logprobs
from .batched import BatchedStep

PROMPT_LOGPROB_ROWS = 64     # echo + logprobs: the prompt's log-softmax this many positions at a time (not (T, V) float64 at once)


@dataclass
class Params:
    """How one sequence is decoded: the Sampler's settings, the length, stops, and what to report."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    logprobs: int | None = None          # top-N log-probabilities of each new token (None: none)
    prompt_logprobs: bool = False        # also those of the prompt's tokens (echo with logprobs)

    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.min_p,
                       self.presence_penalty, self.frequency_penalty, self.logprobs)


@dataclass
class Event:
    """What one engine iteration reports for a sequence: new text (may be empty while a UTF-8
    character or a possible stop string is held back), the tokens drawn with their logprobs
    [(id, logprob, [(id, logprob), ...])] when asked, and at the end the finish reason or an error."""
    text: str = ""
    tokens: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_logprobs: list | None = None  # [(id, logprob | None, top)] for the prompt, with the first event


class Sequence:
    """One choice being generated: its prompt ids, Params, sampler, history and text; emit(Event)
    is called from the engine's thread after each token it draws (and once more if it fails)."""

    def __init__(self, prompt_ids, params: Params, emit):
        self.prompt = np.asarray(prompt_ids, dtype=np.int64)
        self.params, self.emit = params, emit
        self.cancelled = False           # set from any thread; the engine drops the sequence
        self.finished = False
        self.row = None                  # its cache row while running
        self.n_new = 0                   # tokens drawn (the end token included)
        self.last = None                 # the token the next step feeds


class Engine:
    """The decoding thread and its queue (see the module docstring)."""

    def __init__(self, model, tokenizer, parallel: int = 4):
        if int(parallel) != parallel or parallel < 1:
            raise ValueError(f"parallel must be an int >= 1, got {parallel}")
        self.model, self.tokenizer = model, tokenizer
        self.n_vocab = min(model.config.n_vocab, tokenizer.n_vocab)      # ids that may be drawn
        self.eos_id = tokenizer.eot_token
        self.step = BatchedStep(model)
        self.cache = KVCache.for_model(model, parallel)
        self.slots = [None] * parallel                                   # the Sequence in each cache row
        self.waiting = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = None
        self.steps = 0                   # batched steps run, and the rows they decoded (their mean batch size)
        self.rows_decoded = 0

    # ----------------------------------------------------------------- any thread
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="npgpt-engine", daemon=True)
        self._thread.start()
        return self

    def check(self, seqs) -> None:
        """ValueError if one of these sequences cannot fit its row: an empty prompt, or prompt + max_tokens
        beyond the context."""
        n_ctx = self.cache.n_ctx
        for s in seqs:
            if not (len(s.prompt) >= 1 and s.params.max_tokens >= 0 and len(s.prompt) + s.params.max_tokens <= n_ctx):
                raise ValueError(f"a sequence needs 1 .. {n_ctx} prompt tokens and prompt + max_tokens <= {n_ctx}; "
                                 f"got {len(s.prompt)} + {s.params.max_tokens}")

    def submit(self, seqs) -> None:
        """Queue these sequences (ValueError, and none queued, if one cannot fit its row: check)."""
        self.check(seqs)
        with self._cv:
            self.waiting.extend(seqs)
            self._cv.notify()

    def cancel(self, seqs) -> None:
        """Drop these sequences (finished ones are left alone); their rows are free before the next step."""
        with self._cv:
            for s in seqs:
                s.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict:
        """How busy the engine is: rows running, rows free, sequences waiting; batched steps run so far
        and the rows they decoded."""
        running = sum(s is not None for s in self.slots)
        return {"slots_processing": running, "slots_idle": len(self.slots) - running,
                "requests_waiting": len(self.waiting), "decode_steps": self.steps, "decoded_rows": self.rows_decoded}

    # ----------------------------------------------------------------- the engine's thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not any(self.slots):
                    self._cv.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                admitted = []
                for row, s in enumerate(self.slots):
                    if s is None and self.waiting:
                        seq = self.waiting.popleft()
                        seq.row, self.slots[row] = row, seq
                        admitted.append(seq)
            for seq in admitted:
                self._guard([seq], self._prefill, seq)
            running = [s for s in self.slots if s is not None and not s.cancelled]
            if running:
                self._guard(running, self._step, running)

    def _drop_cancelled(self) -> None:
        self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
        for row, s in enumerate(self.slots):
            if s is not None and s.cancelled:
                self.slots[row] = None

    def _guard(self, seqs, fn, *args) -> None:
        """fn(*args); an exception ends seqs with an error event (and is logged), never the loop."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  (whatever it is, the server must go on)
            if not isinstance(e, (FloatingPointError, ValueError)):
                with contextlib.suppress(Exception):      # stderr gone (a closed pipe): the thread must live
                    traceback.print_exc(file=sys.stderr)
            for s in seqs:
                if not s.finished:
                    self._finish(s, Event(error=f"{type(e).__name__}: {e}"))

    def _finish(self, seq, event) -> None:
        seq.finished = True
        if seq.row is not None and self.slots[seq.row] is seq:
            self.slots[seq.row] = None
        self._emit(seq, event)

    def _emit(self, seq, event) -> None:
        try:
            seq.emit(event)
        except Exception:  # noqa: BLE001  (the listener is gone, e.g. its event loop closed)
            seq.cancelled = True
            if seq.row is not None and self.slots[seq.row] is seq:
                self.slots[seq.row] = None

    def _prefill(self, seq) -> None:
        p = seq.params
        seq.sampler = p.sampler()
        seq.history = TokenHistory([seq.prompt], self.n_vocab) if seq.sampler.penalised else None
        seq.streamer = TextStreamer(self.tokenizer, p.stop)
        logits = self.step.prefill(self.cache, seq.row, seq.prompt, all_positions=p.prompt_logprobs)
        first = None
        if p.prompt_logprobs:
            first = self._prompt_logprobs(seq.prompt, logits[:, :self.n_vocab], p.logprobs or 0)
            logits = logits[-1]
        if p.max_tokens == 0:
            self._finish(seq, Event(finish_reason="length", prompt_logprobs=first))
            return
        self._draw(seq, logits[None], first)

    def _step(self, running) -> None:
        logits = self.step(self.cache, [s.row for s in running], [s.last for s in running])   # (A, V)
        self.steps += 1
        self.rows_decoded += len(running)
        for a, seq in enumerate(running):
            self._guard([seq], self._draw, seq, logits[a:a + 1])

    def _draw(self, seq, logits, prompt_logprobs=None) -> None:
        """Draw seq's next token from its logits (1, V), report it, and finish seq if it is done."""
        logits = logits[:, :self.n_vocab]                                   # (1, Vd)
        if not np.isfinite(logits).all():
            raise FloatingPointError(f"the model's next-token logits are not finite (NaN or inf) at new token "
                                     f"{seq.n_new + 1}")
        h = seq.history
        tok = int(seq.sampler(logits, *((h.seen, h.counts) if h else ()))[0])
        seq.n_new += 1
        seq.last = tok
        if h is not None:
            h.add(np.array([tok]))
        event = Event(prompt_logprobs=prompt_logprobs)
        if tok == self.eos_id:
            event.text, event.finish_reason = seq.streamer.finish(), "stop"
        else:
            if seq.params.logprobs is not None:
                top = seq.sampler.last
                event.tokens.append((tok, float(top.chosen[0]), list(zip(top.ids[0].tolist(), top.values[0].tolist()))))
            else:
                event.tokens.append((tok, None, None))
            event.text = seq.streamer.push(tok)
            if seq.streamer.stopped:
                event.finish_reason = "stop"
            elif seq.n_new >= seq.params.max_tokens:
                event.text += seq.streamer.finish()
                event.finish_reason = "length"
        if event.finish_reason:
            self._finish(seq, event)
        else:
            self._emit(seq, event)

    @staticmethod
    def _prompt_logprobs(ids, logits, n):
        """[(id, logprob, top n)] of each prompt token given the ones before it (the first has none)."""
        out = [(int(ids[0]), None, None)]
        for t0 in range(0, len(ids) - 1, PROMPT_LOGPROB_ROWS):              # a block of positions at a time
            t1 = min(len(ids) - 1, t0 + PROMPT_LOGPROB_ROWS)
            top = top_logprobs(logits[t0:t1], ids[t0 + 1:t1 + 1], n)        # position t predicts token t + 1
            out += [(int(t), float(c), list(zip(i.tolist(), v.tolist())))
                    for t, c, i, v in zip(ids[t0 + 1:t1 + 1], top.chosen, top.ids, top.values)]
        return out
