"""Chat messages -> the one prompt text the model continues, in the format it was trained on.

    "instruct"    a model from `npgpt finetune instruct` (the Alpaca format of npgpt/finetune/instruct.py).
                  A system message replaces the header line; each user turn is an instruction, each
                  assistant turn the response to the one before; the prompt ends with the response
                  heading. One user message gives exactly the prompt `npgpt chat` and the fine-tuning
                  feed the model (format_prompt):

                      {system, or: Below is an instruction that describes a task. ...}

                      ### Instruction:
                      {user}

                      ### Response:
                      {assistant}

                      ### Instruction:
                      {user}

                      ### Response:

                  The answer ends at "\\n\\n### " (the model starting a new section), as in `npgpt chat`.
    "transcript"  any other (base) model: a plain transcript it can continue,

                      {system}

                      User: {user}
                      Assistant: {assistant}
                      User: {user}
                      Assistant:

                  and the answer ends where the model starts the user's next line ("\\nUser:").

`detect(path)` says "instruct" for a run directory (or one of its checkpoints) that `npgpt finetune
instruct` wrote, else "transcript".
"""
from __future__ import annotations

import os

from ..finetune.instruct import HEADER, RESPONSE_MARK
from ..train.run import RUN_FILE, is_run_dir, read_json

FORMATS = {
    "instruct": "the Alpaca instruction format `npgpt finetune instruct` trains on",
    "transcript": "a plain 'User:' / 'Assistant:' transcript (a base model)",
}
STOPS = {"instruct": ["\n\n### "], "transcript": ["\nUser:"]}
ROLES = ("system", "developer", "user", "assistant")


def render(messages, fmt: str) -> str:
    """The prompt text for messages [(role, content)] (roles in ROLES, contents strings). A conversation
    that ends with an assistant message is continued: the answer extends that message."""
    system = "\n\n".join(c for r, c in messages if r in ("system", "developer"))
    turns = [(r, c) for r, c in messages if r in ("user", "assistant")]
    ends_with_user = not turns or turns[-1][0] == "user"
    if fmt == "instruct":
        text = system or HEADER
        for role, content in turns:
            text += f"\n\n### Instruction:\n{content}{RESPONSE_MARK}" if role == "user" else content
        return text
    names = {"user": "User", "assistant": "Assistant"}
    lines = [f"{names[r]}: {c}" for r, c in turns] + (["Assistant:"] if ends_with_user else [])
    return (f"{system}\n\n" if system else "") + "\n".join(lines)


def detect(path) -> str:
    """"instruct" if path is (a checkpoint inside) a run of `npgpt finetune instruct`, else "transcript"."""
    d = os.path.abspath(os.fspath(path))
    for cand in (d, os.path.dirname(d), os.path.dirname(os.path.dirname(d))):
        if is_run_dir(cand):
            try:
                return "instruct" if read_json(os.path.join(cand, RUN_FILE)).get("task") == "instruct" else "transcript"
            except (OSError, ValueError, AttributeError):
                return "transcript"
    return "transcript"
