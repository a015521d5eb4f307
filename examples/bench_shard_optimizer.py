"""The data-parallel train step with AdamW whole on every rank against ZeRO-1 (`--shard-optimizer`: each
rank keeps and updates 1/RANKS of AdamW), alternated run by run (ABBA), each run one
`npgpt bench --grid RxT [--shard-optimizer]` (its own mpiexec job, 2 warm-up steps, the median of --steps).
Prints each run's step, communication left exposed (sharded: the reduce-scatter's wait after the backward
and the all-gather after the update; the all-gather alone beside it) and peak RSS of rank 0, then the
median of the paired ratios sharded / whole with their spread. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are
unset for these runs only.

    python examples/bench_shard_optimizer.py --model small --rounds 4 --steps 4
    python examples/bench_shard_optimizer.py --model gpt2 --rounds 4 --steps 3 --grid 2x1
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="small")
ap.add_argument("--grid", default="2x1", help="one RANKSxTHREADS split")
ap.add_argument("--rounds", type=int, default=4)
ap.add_argument("--steps", type=int, default=3)
args = ap.parse_args()
env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
runs = {False: [], True: []}
for r in range(args.rounds):
    for shard in ((False, True) if r % 2 == 0 else (True, False)):
        cmd = [sys.executable, "-m", "npgpt", "bench", "--model", args.model, "--grid", args.grid,
               "--steps", str(args.steps), "--json"] + (["--shard-optimizer"] if shard else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        report = json.loads(out.stdout[out.stdout.index("{"):])
        n = report["grid"][0]["rounds"][0]["npgpt"]
        if "error" in n:
            sys.exit(n["error"])
        runs[shard].append(n)
        print(f"round {r} {'sharded' if shard else 'whole  '}: step {n['seconds']:.3f} s, exposed "
              f"{n['allreduce_in_step_s']:.3f} s ({n['exposed_pct']:.1f}%), all-gather {n.get('allgather_s', 0):.3f} s, "
              f"peak RSS {n['peak_rss_mb']:.0f} MB", flush=True)
print(f"CPU: {report['cpu']}; BLAS: {report['blas']}")
ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs[False], runs[True])]
print(f"sharded / whole step time: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
      f"{len(ratios)} pairs")
