"""Alternate `npgpt bench --workloads train decode` (or the workloads named) between two checkouts (old,
new), same machine, same run; print each round's seconds and the paired median ratio new/old with its
spread (min-max). OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for these runs only.

    git worktree add /tmp/before REV
    python examples/bench_two_checkouts.py /tmp/before . 5                    # OLD NEW ROUNDS
    python examples/bench_two_checkouts.py /tmp/before . 5 prefill decode     # ... WORKLOAD...
"""
import json, os, statistics, subprocess, sys
trees = {"old": sys.argv[1], "new": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
workloads = sys.argv[4:] or ["train", "decode"]
env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
ratios = {w: [] for w in workloads}
for r in range(rounds):
    secs = {}
    for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
        out = subprocess.run([sys.executable, "-m", "npgpt", "bench", "--workloads", *workloads, "--steps", "5",
                              "--json"], cwd=trees[name], env=dict(env, PYTHONPATH=trees[name]),
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rep = json.loads(out.stdout[out.stdout.index("{"):])
        secs[name] = {w: statistics.median(x["npgpt"]["seconds"] for x in rep["results"][w]["rounds"])
                      for w in workloads}
        blas = rep["blas"]
    for w in ratios:
        ratios[w].append(secs["new"][w] / secs["old"][w])
    print(f"round {r}: " + "; ".join(f"{w} old {secs['old'][w]:.4f} s new {secs['new'][w]:.4f} s" for w in ratios),
          flush=True)
print("BLAS:", blas)
for w, xs in ratios.items():
    print(f"{w}: new/old median {statistics.median(xs):.3f} (spread {min(xs):.3f}-{max(xs):.3f}, {len(xs)} rounds)")
