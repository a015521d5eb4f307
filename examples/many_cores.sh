#!/usr/bin/env bash
# Issue 22's many-core figures in one go, for a machine with many cores that is lent for minutes
# (the `device` tool: 16 cores, python3 with numpy, numba, torch, but no package registry and no mpich).
#
# Here, first (fetches the MPI wheels that machine lacks into .whl/, ignored by git):
#     bash examples/many_cores.sh --fetch-wheels
#     bash examples/many_cores.sh /tmp/mc-trial          # the whole script on this machine's cores
# There, one call carrying .whl (results land in $OUT as each run ends; the device tool's `run` with
# carry [".whl"], timeout_s 600, leaves about a minute over the default budget):
#     bash examples/many_cores.sh "$OUT"
#
# What it runs, each under `timeout` and written down as it finishes (a run that overruns loses only itself):
#   machine.txt    lscpu's model name, cores, the BLAS kernel, versions
#   warm.txt       one train step in one process, to compile (and cache) the kernels before 16 ranks load them
#   small-RxT.json `npgpt bench --model small --grid RxT --compare torch` for RxT = 1xN, 4x(N/4), Nx1: tokens/s of
#                  npgpt and PyTorch (one process, or DDP over gloo), npgpt's exposed Allreduce
#   gpt2-RxT.json  the same at GPT-2 124M shapes, Nx1 and 1xN
#   gpt2-Nx1-zero.json  124M at Nx1 with --shard-optimizer (ZeRO-1), npgpt only
#   profile.txt    examples/profile_ops.py at nanoGPT's shape, 1 against N threads, if time is left
#   profile-torch.txt  the same for PyTorch's step (--framework torch): which ops scale worse than PyTorch's,
#                  if time is left
#   env.txt        examples/bench_step_env.py at nanoGPT's shape, N threads: the two thread pools' idle settings
#                  (npgpt's training defaults; OpenBLAS's threads spinning longer; the kernels' threads spinning;
#                  both, as the inference commands run) and the kernels' parallel crossover (NPGPT_PARALLEL_MIN_WORK
#                  2^15, which puts LayerNorm's kernels on every core, alone and with spinning kernel threads),
#                  alternated, if time is left
#   summary.txt    the issue's three 16-core figures from whatever finished
# Environment knobs: MC_TORCH_PYTHON (the Python with torch; default python3), MC_BUDGET (seconds the whole
# script may take; default 540), MC_STEPS (timed train steps a run; default 3).
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "${1:-}" = "--fetch-wheels" ]; then     # for that machine's Python: MC_PY_VERSION (default 3.12, as it had)
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" 2>/dev/null || { mkdir -p "$(dirname "$exclude")" && echo /.whl/ >> "$exclude"; }
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${MC_PY_VERSION:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl mpich mpi4py
fi

out=${1:-${OUT:-many-cores-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
(cd "$out" && rm -f machine.txt log.txt warm.txt profile.txt profile-torch.txt env.txt summary.txt small-*.json \
    gpt2-*.json warm.err profile.err profile-torch.err env.err small-*.err gpt2-*.err)       # a reused folder: the summary reads only this run's files
budget=${MC_BUDGET:-540}
steps=${MC_STEPS:-3}
torch_python=${MC_TORCH_PYTHON:-python3}
start=$(date +%s)
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/npgpt-numba}

# mpich and mpi4py from .whl/ where python3 has no mpi4py. mpich goes in with --prefix (--target drops its
# lib/), and MPI4PY_LIBMPI pins mpi4py to it: bound to another MPI on the machine, every rank sees a world of
# 1 (npgpt stops then, with one line, but the run is lost).
if ! python3 -c "import mpi4py" 2>/dev/null && ls .whl/mpich-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/mc-pfx .whl/mpich-*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mc-site .whl/mpi4py-*.whl ||
        echo "many_cores.sh: mpi4py's wheel is not for this python3 ($(python3 -V)): fetch it with MC_PY_VERSION" >&2
    export PYTHONPATH="$PYTHONPATH:/tmp/mc-site" PATH="/tmp/mc-pfx/bin:$PATH" MPI4PY_LIBMPI=/tmp/mc-pfx/lib/libmpi.so.12
fi

left() { echo $(( budget - ($(date +%s) - start) )); }
log() { echo "[$(date -u +%H:%M:%S), $(( $(date +%s) - start )) s] $*" | tee -a "$out/log.txt"; }

# step NAME FILE SECONDS CMD...: run CMD with at most SECONDS (and never past the budget), stdout to FILE
step() {
    local name=$1 file=$2 secs=$3; shift 3
    local l; l=$(left)
    [ "$secs" -gt "$l" ] && secs=$l
    if [ "$secs" -lt 30 ]; then log "$name: skipped, $l s of the budget left"; return; fi
    log "$name: start ($secs s at most)"
    timeout -k 30 "$secs" "$@" > "$out/$file" 2>> "$out/$name.err"   # -k 30: time for the bench to end its jobs
    log "$name: exit $?"
}

n=$(nproc)
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
    lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L2|L3|Flags)' | cut -c1-200
    python3 -c "import numpy, numba, threadpoolctl; print('numpy', numpy.__version__, 'numba', numba.__version__);
[print('blas:', i.get('internal_api'), i.get('version'), i.get('architecture'), i.get('num_threads')) for i in threadpoolctl.threadpool_info()]"
    "$torch_python" -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads())" 2>&1 | tail -1
    python3 -c "import mpi4py.MPI as M; print('mpi', M.Get_library_version().splitlines()[0])" 2>&1 | tail -1
} > "$out/machine.txt" 2>&1
log "machine: $(grep 'Model name' "$out/machine.txt" | sed 's/  */ /g'), $n CPUs"

# one bench run a split (a run that overruns loses only that split), small shapes first: they are cheap
q=$(( n >= 8 ? 4 : 1 ))
small_splits="1x$n ${n}x1"
[ "$q" -gt 1 ] && small_splits="1x$n ${q}x$(( n / q )) ${n}x1"
step warm warm.txt 240 python3 -m npgpt bench --model small --workloads train --steps 1 --rounds 1 --threads "$n"
for split in $small_splits; do
    step "small-$split" "small-$split.json" 100 python3 -m npgpt bench --model small --grid "$split" --compare torch \
        --torch-python "$torch_python" --steps "$steps" --rounds 1 --timeout 45 --json
done
for split in "${n}x1" "1x$n"; do
    step "gpt2-$split" "gpt2-$split.json" 170 python3 -m npgpt bench --model gpt2 --grid "$split" --compare torch \
        --torch-python "$torch_python" --steps "$steps" --rounds 1 --timeout 80 --json
done
step "gpt2-${n}x1-zero" "gpt2-${n}x1-zero.json" 70 python3 -m npgpt bench --model gpt2 --grid "${n}x1" --shard-optimizer \
    --steps "$steps" --rounds 1 --timeout 60 --json
step profile profile.txt 100 python3 examples/profile_ops.py --shape nanogpt --B 12 --T 64 --steps 10 --rounds 2 \
    --threads "$n"
step profile-torch profile-torch.txt 100 "$torch_python" examples/profile_ops.py --framework torch --shape nanogpt \
    --B 12 --T 64 --steps 10 --rounds 2 --threads "$n"
if [ "$(left)" -ge 90 ]; then      # it prints only at its end: cut short, it would leave nothing
    step env env.txt 90 python3 examples/bench_step_env.py --rounds 3 --steps 40 --warmup 5 "" OPENBLAS_THREAD_TIMEOUT=20 \
        GOMP_SPINCOUNT=10000 OPENBLAS_THREAD_TIMEOUT=20,GOMP_SPINCOUNT=10000 NPGPT_PARALLEL_MIN_WORK=32768 \
        NPGPT_PARALLEL_MIN_WORK=32768,GOMP_SPINCOUNT=10000
else
    log "env: skipped, $(left) s of the budget left (it needs 90)"
fi

# the figures issue 22's acceptance asks for, from whatever finished
python3 - "$out" "$n" <<'PY' | tee "$out/summary.txt"
import glob, json, os, sys
out, n = sys.argv[1], int(sys.argv[2])
rows = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(path)[:-5]
    try:
        rep = json.load(open(path))
    except ValueError:
        print(f"{name}: no report (ended by its timeout?)")
        continue
    for row in rep["grid"]:
        rows[name] = row
        npg, tor = row.get("npgpt"), row.get("torch")
        first = row["rounds"][0]
        err = "; ".join(f"{fw}: {r['error'][:120]}" for fw, r in first.items() if "error" in r)
        line = f"{name:22s}"
        if npg:
            line += f" npgpt {npg['tokens_per_s']:7.0f} tok/s"
            if row["ranks"] > 1:
                line += f", exposed {npg['exposed_pct']:4.1f}%"
        if tor:
            line += f" | PyTorch {tor['tokens_per_s']:7.0f} tok/s"
        if "median_ratio" in row:
            line += f" | npgpt / PyTorch {row['median_ratio']:.2f}x"
        print(line + (f"  [{err}]" if err else ""))
for model in ("small", "gpt2"):
    mine = {k: r for k, r in rows.items() if k.startswith(model + "-") and not k.endswith("-zero")}
    one = mine.get(f"{model}-1x{n}", {})
    if "median_ratio" in one:
        print(f"{model}: one process, {n} threads: {one['median_ratio']:.2f}x PyTorch's {n} threads (goal >= 1.0)")
    best = {fw: max((r[fw]["tokens_per_s"] for r in mine.values() if fw in r), default=None) for fw in ("npgpt", "torch")}
    if best["npgpt"] and best["torch"]:
        print(f"{model}: best split / PyTorch's best split: {best['npgpt'] / best['torch']:.2f}x (goal >= 1.3)")
    many = mine.get(f"{model}-{n}x1", {}).get("npgpt")
    if many:
        print(f"{model}: Allreduce left exposed at {n} ranks: {many['exposed_pct']:.1f}% of the step (goal < 5)")
PY
log "done; $(left) s of the budget left"
