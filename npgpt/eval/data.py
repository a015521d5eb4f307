"""What `npgpt eval --data` names: public evaluation sets downloaded once into the cache, or a user's file.

    wikitext-2     WikiText-2 (raw), its test split (wiki.test.raw inside wikitext-2-raw-v1.zip)
    wikitext-103   WikiText-103 (raw), its test split (the same file as WikiText-2's; the zip is 192 MB)
    lambada        OpenAI's lambada_test.jsonl: 5,153 {"text"} rows, the file lm-evaluation-harness's
                   lambada_openai task reads (its Hugging Face copy, EleutherAI/lambada_openai, is the same bytes)
    hellaswag      HellaSwag's validation split, hellaswag_val.jsonl: 10,042 {"ctx", "endings", "label"} rows,
                   the file llm.c's dev/data/hellaswag.py (and Karpathy's build-nanogpt) downloads

Each is downloaded (resumable, atomic: npgpt.io.download.download_file) to `<cache>/data/<file>` and must
have the size and SHA-256 pinned below, checked on every use; a file that has not is deleted, and
nothing is evaluated. Offline, put the file there yourself (the error says where). The pins are
published values: the WikiText zips' in Hugging Face datasets' wikitext dataset_infos.json (the same
hashes in lm-evaluation-harness's former wikitext task and in mlx-data's loader), lambada_test.jsonl's
in lm-evaluation-harness's former lambada task (its size in EleutherAI/lambada_openai's file listing),
hellaswag_val.jsonl's in Hugging Face datasets' hellaswag dataset_infos.json (the one source found).

A WikiText test split is scored as the Hugging Face perplexity guide builds it: the datasets
library's rows (each line of the file with its newline, a blank line as "") joined by "\\n\\n".
Any other --data (a text file, a directory of .txt files, a URL, the-verdict, tinyshakespeare) is
read as `npgpt train` reads it (npgpt.train.sources).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass

from ..io.download import DownloadError, _sha256, download_file
from ..io.download import cache_dir as default_cache_dir
from ..train import sources


@dataclass(frozen=True)
class NamedSet:
    """A public evaluation file: where it is, what it must be, and what it is for."""
    url: str
    file: str              # its name in <cache>/data/
    bytes: int
    sha256: str
    task: str              # "ppl" | "lambada" | "choice": what --task it serves
    member: str = ""       # the test split's file inside a zip


NAMED = {
    "wikitext-2": NamedSet("https://wikitext.smerity.com/wikitext-2-raw-v1.zip", "wikitext-2-raw-v1.zip", 4_721_645,
                           "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11", "ppl",
                           "wikitext-2-raw/wiki.test.raw"),
    "wikitext-103": NamedSet("https://wikitext.smerity.com/wikitext-103-raw-v1.zip", "wikitext-103-raw-v1.zip",
                             191_984_949, "91c00ae287f0d699e18605c84afc9e45c192bc6b7797ff8837e5474655a33794", "ppl",
                             "wikitext-103-raw/wiki.test.raw"),
    "lambada": NamedSet("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                        "lambada_test.jsonl", 1_819_752,
                        "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226", "lambada"),
    "hellaswag": NamedSet("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
                          "hellaswag_val.jsonl", 12_246_618,
                          "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588", "choice"),
}
TASK_KEYS = {"lambada": ("text",), "choice": ("ctx", "endings", "label")}


@dataclass
class ChoiceItem:
    """A multiple-choice item in HellaSwag's layout: the context, its candidate endings, the right one's index."""
    ctx: str
    endings: list
    label: int


def default_task(data) -> str | None:
    """The task a named set serves (None for anything else)."""
    return NAMED[data].task if data in NAMED else None


def fetch(name: str, cache_dir=None, progress: bool = True) -> str:
    """The verified cached copy of NAMED[name], downloaded the first time (see the module docstring)."""
    s = NAMED[name]
    dest = os.path.join(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), "data", s.file)
    if not os.path.isfile(dest):
        try:                                   # dest only once its size and hash are checked (verify)
            download_file(s.url, dest, desc=name, progress=progress, max_bytes=s.bytes,
                          verify=lambda part: _check(part, name, s))
        except DownloadError as e:
            if not e.offline:
                raise
            raise DownloadError(f"cannot download {name} ({e}). If this machine is offline, download {s.url} "
                                f"elsewhere and put it at {dest}", s.url, offline=True) from None
    _check(dest, name, s)
    return dest


def _check(path: str, name: str, s: NamedSet) -> None:
    """DownloadError, and the file deleted, unless it has the pinned size and SHA-256."""
    got = os.path.getsize(path)
    problem = f"{got:,} bytes, not {s.bytes:,}" if got != s.bytes else None
    if problem is None and (digest := _sha256(path)) != s.sha256:
        problem = f"sha256 {digest}, not {s.sha256}"
    if problem:
        os.unlink(path)
        raise DownloadError(f"{path}: {problem}: not the {name} file of {s.url}; deleted it")


def hf_rows_text(raw: str) -> str:
    """A text file as the Hugging Face perplexity guide scores a split of it: the datasets library's
    rows (every line with its newline; a blank one as "") joined by two newlines."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")     # Python's universal newlines
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return "\n\n".join(row if row.strip() else "" for row in rows)


def load_text(data, cache_dir=None, progress: bool = True, max_bytes: int | None = None) -> tuple[str, str]:
    """(text, description) of --data for perplexity: a WikiText test split, or what npgpt train reads."""
    data = os.fspath(data)
    if data in NAMED:
        s = _for_task(data, "ppl")
        path = fetch(data, cache_dir, progress)
        try:
            with zipfile.ZipFile(path) as z:
                raw = z.read(s.member).decode("utf-8")
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as e:
            raise ValueError(f"--data {data}: cannot read {s.member} from {path}: {e}") from None
        return hf_rows_text(raw), f"{data} (test)"
    _known(data)
    return sources.load_text(data, cache_dir=cache_dir, progress=progress, max_bytes=max_bytes)


def _for_task(name: str, task: str) -> NamedSet:
    s = NAMED[name]
    if s.task != task:
        raise ValueError(f"--data {name} is a set for --task {s.task}, not --task {task}")
    return s


def _known(data: str) -> None:
    """ValueError listing every name when `data` looks like a name but is none and no such path exists."""
    if data in sources.BUNDLED or data in sources.NAMED_URLS or sources.is_url(data) or os.path.exists(data):
        return
    if not any(ch in data for ch in "./\\"):
        names = ", ".join([*NAMED, *sources.BUNDLED, *sources.NAMED_URLS])
        raise ValueError(f"--data {data!r}: unknown set name and no such file or directory (names: {names}; "
                         f"or give a file, a directory or an http(s) URL)")
    raise FileNotFoundError(f"--data {data}: no such file or directory")


def local_file(data, task: str, cache_dir=None, progress: bool = True, max_bytes: int | None = None) -> str:
    """The file --data names for a task: a named set's verified copy, a URL's cached copy, or a path."""
    data = os.fspath(data)
    if data in NAMED:
        _for_task(data, task)
        return fetch(data, cache_dir, progress)
    if sources.is_url(data):
        root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        return sources.fetch_url(data, root, None, progress, max_bytes)
    _known(data)
    if not os.path.isfile(data):
        raise ValueError(f"--data {data}: --task {task} reads a file, not a directory")
    return data


def read_jsonl(path, task: str) -> list:
    """The rows of a JSONL file for `task` (TASK_KEYS): LAMBADA texts (str) or ChoiceItems. ValueError
    naming the file and line for anything else: not JSON, a missing key, a value of the wrong kind."""
    keys = TASK_KEYS[task]
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        missing = [k for k in keys if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: no {', '.join(repr(k) for k in missing)} key (--task {task} reads rows "
                             f"with {', '.join(keys)})")
        rows.append(_lambada_text(row, where) if task == "lambada" else _choice_item(row, where))
    if not rows:
        raise ValueError(f"{path}: the file is empty (no JSONL rows)")
    return rows


def _lambada_text(row, where) -> str:
    text = row["text"]
    if not isinstance(text, str) or " " not in text or not all(text.rsplit(" ", 1)):
        raise ValueError(f"{where}: 'text' must be a string of words with a last word after its last space "
                         f"(the target) and something before it (the context)")
    return text


def _choice_item(row, where) -> ChoiceItem:
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not isinstance(endings, list) or not endings \
            or not all(isinstance(e, str) and e for e in endings):
        raise ValueError(f"{where}: 'ctx' must be a string and 'endings' a non-empty list of non-empty strings")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)                      # Hugging Face's copy stores the label as a string
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ValueError(f"{where}: 'label' must be the index of the right ending, in [0, {len(endings)}), "
                         f"got {row['label']!r}")
    return ChoiceItem(ctx, endings, label)
