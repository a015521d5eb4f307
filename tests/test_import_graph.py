"""The package's layout is its data flow: modules import only what lies below them, never in a circle.

    rank 0  config, tokens, fast,       shapes and presets; text <-> ids; the kernels and process settings;
            io.atomic, signals          writing a file whole or not at all; handlers set for a while (neither
                                        imports anything of npgpt)
    rank 1  layers                      NumPy math, forward and backward
    rank 2  model, loss                 GPT; cross-entropy
    rank 3  optim, inference            AdamW, clipping, schedule; KV cache, sampling, decoding, 8/16-bit
    rank 4  io                          every file format, and the one module that loads and saves models
    rank 5  train, distributed          data, the loop, run directories; processes
    rank 6  finetune, gradcheck, eval   classification, instructions, LoRA; checks against finite differences;
                                        perplexity and zero-shot tasks
    rank 7  bench, cli, serve           the benchmark harness; argparse -> recipes; the HTTP server

Every import counts, those inside functions too. npgpt/__init__.py, the public API, is above them all.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "npgpt"
RANKS = {"config": 0, "tokens": 0, "fast": 0, "io.atomic": 0, "signals": 0, "layers": 1, "model": 2, "loss": 2, "optim": 3, "inference": 3,
         "io": 4, "train": 5, "distributed": 5, "finetune": 6, "gradcheck": 6, "eval": 6, "bench": 7, "cli": 7,
         "serve": 7, "__main__": 7}


def modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set) -> set:
    """The package's modules that `name` imports (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def rank(name: str) -> int:
    """The rank of the longest entry of RANKS that names the module or a package holding it."""
    parts = name.split(".")[1:]
    return next(RANKS[".".join(parts[:k])] for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in RANKS)


def graph() -> dict:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items() if name != "npgpt"}


def test_no_module_imports_one_above_it():
    upward = sorted(f"{a} (rank {rank(a)}) imports {b} (rank {rank(b)})"
                    for a, deps in graph().items() for b in deps if b != "npgpt" and rank(b) > rank(a))
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    g = graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                circles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_no_module_imports_the_package_facade():
    """npgpt/__init__.py gathers the public names; a module inside the package that imported it would
    run every other module first."""
    assert not sorted(a for a, deps in graph().items() if "npgpt" in deps)


BLOCKED = ("tiktoken", "requests", "numba", "matplotlib", "scipy", "tqdm")
WITHOUT_EXTRAS = f"""
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocked())
import numpy as np
import npgpt.layers as L
x = np.random.default_rng(0).standard_normal((2, 3, 8))
block = L.Block(8, 2, seed=0)
y = block(x)
block.backward(np.ones_like(y))
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
"""


def test_the_layers_need_only_numpy():
    """`import npgpt.layers` and a block's forward and backward with the NumPy kernels, in a process
    where tiktoken, requests, numba, matplotlib, scipy and tqdm cannot be imported."""
    env = dict(os.environ, NPGPT_KERNELS="numpy", PYTHONPATH=str(PACKAGE.parent))
    r = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok []", r.stderr
