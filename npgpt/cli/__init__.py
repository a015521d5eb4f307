"""The `npgpt` command line. Each command is a module of this package (`npgpt/cli/<command>.py`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..fast import settings


INFERENCE_COMMANDS = ("generate", "chat", "classify", "serve")   # many small kernels per token: spin, don't sleep


def _argv_command():
    """The command this process was started with (`npgpt generate ...`: generate), before argparse runs."""
    return next((a for a in sys.argv[1:] if not a.startswith("-")), None)


# the `npgpt` command's process: before its commands' modules load NumPy (and OpenBLAS reads it)
settings.blas_threads_spin_briefly(settings.INFERENCE_BLAS_TIMEOUT if _argv_command() in INFERENCE_COMMANDS else "4")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# One module per command, each with add_parser(subparsers) and run(args). Imported eagerly: a broken
# import is a bug to see, not a command to hide.
COMMANDS = ("gradcheck", "info", "download", "convert", "generate", "train", "finetune", "classify", "chat", "bench",
            "eval", "serve")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    p = argparse.ArgumentParser(prog="npgpt", description="GPT-2 in NumPy with hand-written backward passes.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


def quiet_on_broken_pipe(run, args) -> int:
    """run(args), and when the reader of stdout goes away (`npgpt info DIR | head -3`), stop quietly
    with status 0 instead of a traceback (stdout is pointed at /dev/null so Python's final flush does
    not fail again). Every command runs under it (_main)."""
    try:
        return run(args)
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0


@contextlib.contextmanager
def recipe_errors():
    """A library recipe's user errors as CLIError: the ValueError or OSError (FloatingPointError: a run
    gone non-finite) whose one line names the flag or file. A reader of stdout that went away stays a
    BrokenPipeError (quiet_on_broken_pipe)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except (ValueError, OSError, FloatingPointError) as e:
        raise CLIError(str(e)) from None


def interrupted(fit) -> str:
    """How a training command says its run stopped early: "interrupted" (Ctrl-C) or "stopped by SIGTERM"."""
    return "interrupted" if fit.signal in (None, "SIGINT") else f"stopped by {fit.signal}"


def one_line(msg) -> str:
    """A possibly multi-line message as one line."""
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())



def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings.apply(inference=args.command in INFERENCE_COMMANDS)
    from ..distributed import launched_by_mpi
    if launched_by_mpi():
        return _main_mpi(args)
    return _main(args)


def _main_mpi(args) -> int:
    """Under mpiexec: an exception on any rank prints one line naming the rank and aborts the whole
    job (MPI Abort), so no rank waits forever in a collective for a rank that is gone. A user error
    (CLIError) raised alike on every rank is printed once, by rank 0."""
    import time
    import traceback

    from .. import distributed
    try:
        dist = distributed.init()
    except distributed.LaunchMismatch as e:  # every process alone: the launcher's rank 0 says why, once
        if not e.rank:
            print(f"npgpt {args.command}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    try:
        return _main(args, raise_user_errors=True)           # a normal return (0, 130, 143) ends every rank alike
    except CLIError as e:
        if not dist.is_main:
            time.sleep(2.0)              # rank 0 most likely hit the same error: let it report and abort
        where = "" if dist.world_size == 1 else (f" (rank {dist.rank} of {dist.world_size})" if dist.rank else "")
        print(f"npgpt {args.command}: error{where}: {one_line(e)}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        # a second Ctrl-C, or one before training took it over: end the job (other ranks may be waiting
        # for this one in a collective)
        print(f"npgpt {args.command}: interrupted on rank {dist.rank} of {dist.world_size}", file=sys.stderr,
              flush=True)
        code = 130
    except BaseException as e:           # noqa: BLE001  (SystemExit too: the job must end)
        if os.environ.get("NPGPT_TRACEBACK"):
            traceback.print_exc()
        print(f"npgpt {args.command}: error on rank {dist.rank} of {dist.world_size}: "
              f"{type(e).__name__}: {one_line(e)}", file=sys.stderr, flush=True)
        code = 1
    if dist.world_size > 1:
        sys.stdout.flush()
        time.sleep(1.0)                  # let the launcher forward the line before Abort tears the job down
        dist.abort(code)
    return code


def say_if_compiling(command) -> None:
    """One line on stderr, for a person at a terminal, when the decoding kernels are not in Numba's disk
    cache: the first token then waits for them to compile (once after an install, an upgrade or an edit;
    14.8-17.0 s on 2 cores of a Zen 4, docs/performance.md "Cold start"). Nothing when stderr is a pipe or
    a file (scripts, tests), or on the NumPy kernels. generate and chat call it once their arguments are
    checked, before the model loads (the load compiles too) and only when they will decode."""
    if not sys.stderr.isatty():
        return
    from .. import fast
    if not fast.use_numba():
        return
    from ..fast import _jit, decode, quant
    one_row = {decode.block_kernel(1, quant.side_by_side(), int8) for int8 in (False, True)}   # float, int8
    if all(_jit.cache_is_cold(kernel) for kernel in one_row):
        print(f"npgpt {command}: compiling the decoding kernels for this CPU, once (~15 s on 2 cores, "
              "more on slower ones; cached for later runs)", file=sys.stderr, flush=True)


def _main(args, raise_user_errors: bool = False) -> int:
    try:
        from .. import fast
        from ..fast import settings
        try:
            fast.get_backend()            # a bad NPGPT_KERNELS is a user error, reported up front
            settings.packed_rows()        # and a bad NPGPT_PACKED_ROWS, NPGPT_PREFETCH_ROWS or
            settings.prefetch_rows(0)     # NPGPT_PARALLEL_MIN_WORK
            settings.parallel_min_work()
        except ValueError as e:
            raise CLIError(str(e)) from None
        return quiet_on_broken_pipe(args.func, args)
    except CLIError as e:
        if raise_user_errors:
            raise
        print(f"npgpt {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if raise_user_errors:             # under mpiexec: _main_mpi ends the whole job
            raise
        print(f"npgpt {args.command}: interrupted", file=sys.stderr)
        return 130
