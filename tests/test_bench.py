"""`npgpt bench` runs end to end on a tiny config and reports what it promises (figures, BLAS, JSON)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from npgpt.distributed import MPI_ENV


def test_bench_json_tiny_config():
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "256", "--workloads", "train", "train-loop", "prefill", "decode",
           "--steps", "1", "--reps", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["config"]["n_layer"] == 1 and report["config"]["n_vocab"] == 101
    assert "openblas" in report["blas"].lower() or "blas" in report["blas"].lower()
    res = report["results"]
    assert res["train"]["npgpt"]["seconds"] > 0 and res["train"]["npgpt"]["peak_rss_mb"] > 0
    assert res["prefill"]["npgpt"]["tokens_per_s"] > 0 and res["decode"]["npgpt"]["tokens_per_s"] > 0
    assert res["prefill"]["npgpt"]["gemm_seconds"] > 0 and res["prefill"]["npgpt"]["over_gemm"] > 0   # its GEMM replay
    loop = res["train-loop"]["npgpt"]                       # the training loop's overhead over a bare step
    assert loop["tokens_per_s"] > 0 and loop["bare_tokens_per_s"] > 0 and loop["overhead"] > -1
    assert "torch" not in res["train"]                      # no --compare: npgpt alone


def test_bench_startup_reports_both_starts_of_generate():
    """The startup workload's two `npgpt generate` processes (the first in an empty kernel cache), each to
    its first token; a process that fails makes the bench fail. Run on the NumPy kernels, where nothing
    compiles, so the two starts are alike: in an empty Numba cache the first would compile every decoding
    kernel again (~15 s on 2 cores, what the benchmark is there to show), and the rest of the suite compiles
    and tests those already. What this checks is the workload's plumbing and report."""
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "64", "--workloads", "startup", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, NPGPT_KERNELS="numpy"))
    assert r.returncode == 0, r.stderr
    startup = json.loads(r.stdout)["results"]["startup"]["npgpt"]
    assert 0 < startup["cold_first_token_s"] < 60 and 0 < startup["warm_first_token_s"] < 60


def test_bench_startup_fails_when_generate_fails(monkeypatch):
    from npgpt.bench import npgpt_startup
    monkeypatch.setenv("NPGPT_KERNELS", "fortran")          # the generate processes refuse it and exit
    with pytest.raises(RuntimeError, match=r"npgpt generate \(cold start\) exited with 2 before its first token: .*NPGPT_KERNELS"):
        npgpt_startup(dict(n_vocab=101, n_ctx=64, n_embd=32, n_head=2, n_layer=1))


def test_bench_weights_int8_decode_batch():
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "256", "--workloads", "prefill", "decode", "--weights", "int8",
           "--decode-batch", "3", "--reps", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["options"]["weights"] == "int8" and report["options"]["decode_B"] == 3
    from npgpt.fast import _q8
    assert report["int8_products"] == _q8.instructions() and report["int8_products"] in _q8.PATHS
    dec = report["results"]["decode"]["npgpt"]
    assert dec["weights"] == "int8" and dec["tokens_per_s"] > 0 and dec["weight_bytes"] > 0


def test_bench_rounds_alternate_and_report_medians():
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "64", "--workloads", "prefill", "--prefill-T", "16",
           "--reps", "1", "--rounds", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rounds"] == 2
    prefill = report["results"]["prefill"]
    assert len(prefill["rounds"]) == 2 and all(p["npgpt"]["tokens_per_s"] > 0 for p in prefill["rounds"])
    assert prefill["npgpt"] == prefill["rounds"][0]["npgpt"]      # the first round's figures at the top
    assert "median_ratio" not in prefill                          # no --compare: nothing to divide by


def test_round_medians_are_same_round_ratios():
    from npgpt.bench import _round_medians
    rounds = [{"npgpt": {"tokens_per_s": n}, "torch": {"tokens_per_s": t}} for n, t in [(10, 5), (9, 10), (12, 8)]]
    m = _round_medians("prefill", rounds)
    assert m["ratios"] == [2.0, 0.9, 1.5] and m["median_ratio"] == 1.5 and "median_ceiling" not in m
    rounds = [{"npgpt": {"tokens_per_s": 10, "gemm_seconds": g, "over_gemm": 1.1}, "torch": {"tokens_per_s": 8, "seconds": t}}
              for g, t in [(1.0, 1.5), (0.5, 1.0), (1.0, 1.2)]]
    m = _round_medians("prefill", rounds)                         # torch's prefill over npgpt's GEMMs alone
    assert m["ceilings"] == [1.5, 2.0, 1.2] and m["median_ceiling"] == 1.5 and m["median_over_gemm"] == 1.1
    rounds = [{"npgpt": {"seconds": 1.0, "over_gemm": 1.2}, "torch": {"seconds": 2.0}},
              {"npgpt": {"seconds": 3.0, "over_gemm": 1.1}, "torch": {"seconds": 2.0}}]
    m = _round_medians("train", rounds)                           # train rows: time ratio npgpt / torch
    assert m["ratios"] == [0.5, 1.5] and m["median_ratio"] == 1.0 and m["median_over_gemm"] == 1.15
    bad = subprocess.run([sys.executable, "-m", "npgpt", "bench", "--rounds", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--rounds must be >= 1" in bad.stderr


def test_prefill_gemm_replay_counts_the_prefills_products():
    """Counted by hand for L=2, C=8, NH=2 (hs=4), V=11, T=5, query/key blocks of 4: the first block's
    linears on 5 rows, the last block's qkv on 5 and the rest on its one kept row, the LM head on one;
    the attention as the fused kernel's tiles (rows 0-3 against keys 0-3, row 4 against keys 0-4) or
    materialised (5 x 5), and the last block's one query against 5 keys."""
    import npgpt
    from npgpt.bench import prefill_gemm_replay
    model = npgpt.GPT(npgpt.GPTConfig(n_layer=2, n_embd=8, n_head=2, n_vocab=11, n_ctx=16), seed=0).eval()
    linears = 2 * 5 * 8 * 24 * 2 + 2 * (5 + 1) * (8 * 8 + 2 * 8 * 32) + 2 * 8 * 11     # 10928
    last_query = 2 * 2 * 1 * 5 * 4 * 2                                                 # 160
    tiles = (2 * 2 * 4 * 4 * 4 + 2 * 2 * 1 * 5 * 4) * 2                               # 672
    full = 2 * 2 * 5 * 5 * 4 * 2                                                       # 800
    assert not model.h[0].attn.runs_fused(5)                        # T=5 is below the fused kernel's threshold
    run, flops = prefill_gemm_replay(model, 5, block=4)
    run()
    assert flops == linears + last_query + full == 11888
    for blk in model.h:
        blk.attn.flash_min_T = 1                               # the fused kernel from T=1
    assert model.h[0].attn.runs_fused(5)
    run, flops = prefill_gemm_replay(model, 5, block=4)
    run()
    assert flops == linears + last_query + tiles == 11760


# ----------------------------------------------------------------------------- --grid: ranks x threads
def _have_mpi():
    from npgpt.bench import _have_mpi4py, find_mpiexec
    return find_mpiexec() is not None and _have_mpi4py()


def test_parse_grid_splits_and_default():
    from npgpt.bench import parse_grid
    assert parse_grid("1x2, 2X1,1x2", 4) == [(1, 2), (2, 1)]              # as given, repeats dropped
    assert parse_grid(None, 4) == [(1, 4), (2, 2), (4, 1)]                # every ranks x threads == cores
    assert parse_grid("auto", 6) == [(1, 6), (2, 3), (3, 2), (6, 1)]
    for bad in ("2y1", "0x2", "2x", "", "1x2x3"):
        with pytest.raises(ValueError, match="--grid"):
            parse_grid(bad, 4)


def test_grid_bad_input_is_one_line():
    def bench(*args):
        r = subprocess.run([sys.executable, "-m", "npgpt", "bench", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return r.stderr
    assert "--batch 16 is not a multiple of the 3 ranks of --grid 3x1" in bench("--grid", "1x1,3x1")
    assert "'2y1' is not RANKSxTHREADS" in bench("--grid", "2y1")
    assert "leave out --workloads" in bench("--grid", "--workloads", "train")
    assert "--context 300 is longer than the model's n_ctx 256" in bench("--grid", "1x1", "--n-ctx", "256", "--context", "300")
    if not _torch_importable():                        # this Python has no torch: --compare names where it looked
        assert sys.executable in bench("--grid", "1x1", "--compare", "torch", "--torch-python", sys.executable)


def _torch_importable():
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def test_grid_summary_best_and_table():
    """Medians over the rounds that ran (a failed run left out), same-round speed ratios, each side's best."""
    from npgpt.bench import _best, _split_summary, grid_table
    run = lambda s, exposed=0.0: {"seconds": s, "allreduce_in_step_s": exposed, "exposed_pct": 100 * exposed / s}
    one = [{"npgpt": run(2.0), "torch": {"seconds": 1.0}}, {"npgpt": run(4.0), "torch": {"seconds": 3.0}},
           {"npgpt": {"error": "timed out after 5 s (--timeout)"}, "torch": {"seconds": 9.0}}]
    two = [{"npgpt": run(1.0, 0.1), "torch": {"seconds": 2.0}}, {"npgpt": run(1.0, 0.3), "torch": {"seconds": 4.0}}]
    rows = [dict(ranks=1, threads=2, rounds=one), dict(ranks=2, threads=1, rounds=two)]
    for row in rows:
        row.update(_split_summary(row["rounds"], 1000))
    assert rows[0]["npgpt"]["seconds"] == 3.0 and rows[0]["npgpt"]["tokens_per_s"] == 1000 / 3.0
    assert rows[0]["torch"]["seconds"] == 3.0 and rows[0]["ratios"] == [0.5, 0.75]      # the failed round left out
    assert rows[1]["npgpt"]["allreduce_in_step_s"] == 0.2 and rows[1]["npgpt"]["exposed_pct"] == 20.0
    assert rows[1]["median_ratio"] == 3.0
    best = _best(rows)
    assert (best["npgpt"]["ranks"], best["npgpt"]["threads"]) == (2, 1) and best["npgpt"]["tokens_per_s"] == 1000
    assert (best["torch"]["ranks"], best["torch"]["threads"]) == (1, 2) and best["ratio"] == 1000 / (1000 / 3.0)
    table = grid_table({"compare": "torch", "grid": rows, "best": best}).splitlines()
    assert table[2] == "| 1 x 2 | 333 | 3.000 s |  | 333 (one process) | 3.000 s | 0.62x |"
    assert table[3] == "| 2 x 1 | 1000 | 1.000 s | 0.200 s (20.0%) | 333 (DDP, gloo) | 3.000 s | 3.00x |"
    assert table[4].startswith("best npgpt: 2 x 1, 1000 tok/s; best PyTorch: 1 x 2, 333 tok/s; npgpt's best / PyTorch's best 3.00x")


def test_launch_ends_a_hung_job_and_its_children(tmp_path):
    """A run past --timeout is ended with everything it started; one failing rank ends the others at once."""
    from npgpt.bench import _launch
    pidfile = tmp_path / "child.pid"
    hang = [sys.executable, "-c", "import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)"]
    t0 = time.monotonic()
    status, _, _ = _launch([(hang, dict(os.environ))], timeout=3)
    assert status == 124 and time.monotonic() - t0 < 30
    assert not _alive(int(pidfile.read_text()))        # the grandchild (an MPI rank's place) is gone too
    fail = [sys.executable, "-c", "import sys; print('rank 1 broke', file=sys.stderr); sys.exit(3)"]
    t0 = time.monotonic()
    status, _, err = _launch([(hang, dict(os.environ)), (fail, dict(os.environ))], timeout=100)
    assert status == 3 and "rank 1 broke" in err and time.monotonic() - t0 < 30


def _bench_waiting_for_a_job(tmp_path, job_setup="", bench_setup=""):
    """A process in _launch, waiting for one sleeping job (job_setup and bench_setup: Python run first in
    each) -> (the bench's Popen, the job's pid once it is running)."""
    pidfile = tmp_path / "job.pid"
    job = [sys.executable, "-c", f"import os, signal, time\n{job_setup}\n"
           f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
    bench = subprocess.Popen([sys.executable, "-c", f"import os, signal\n{bench_setup}\nfrom npgpt.bench import _launch; "
                              f"_launch([({job!r}, dict(os.environ))], timeout=120)"])
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bench, int(pidfile.read_text())


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_terminated_bench_ends_the_jobs_it_started(tmp_path, signame):
    """`timeout` (SIGTERM) or a closed terminal (SIGHUP) ending `npgpt bench --grid` ends its runs too: they
    are in their own sessions, so nothing else would, and left running they would take the cores of whatever
    is timed next. The bench exits 128 + the signal."""
    bench, job_pid = _bench_waiting_for_a_job(tmp_path)
    bench.send_signal(getattr(signal, signame))
    assert bench.wait(timeout=30) == 128 + getattr(signal, signame)
    assert not _alive(job_pid)


def test_a_second_sigterm_does_not_cut_the_ending_short(tmp_path):
    """`timeout` signals the bench, then its group: a SIGTERM while the bench ends a job that ignores SIGTERM
    (so it waits the 5 s before SIGKILL) must not stop the ending before the SIGKILL."""
    bench, job_pid = _bench_waiting_for_a_job(tmp_path, job_setup="signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    bench.send_signal(signal.SIGTERM)
    time.sleep(1.0)                                     # the bench is in its 5 s wait for the job
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    assert not _alive(job_pid)


def test_a_bench_under_nohup_outlives_the_terminal(tmp_path):
    """A SIGHUP the process ignores (nohup) stays ignored while the bench waits: its runs go on; SIGTERM
    still ends them."""
    bench, job_pid = _bench_waiting_for_a_job(tmp_path, bench_setup="signal.signal(signal.SIGHUP, signal.SIG_IGN)")
    bench.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert bench.poll() is None and _alive(job_pid)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    assert not _alive(job_pid)


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _have_mpi(), reason="mpiexec or mpi4py not installed")
def test_grid_runs_ranks_under_mpiexec():
    """`npgpt bench --grid 1x1,2x1`: one process, then 2 ranks under mpiexec that really form one job
    (world of 2, every gradient byte summed, some of it during the backward), with sane figures."""
    from npgpt.bench import grid_table
    env = {k: v for k, v in os.environ.items() if k not in MPI_ENV}
    env["NPGPT_KERNELS"] = "numpy"                     # MPI does not depend on the kernels; no compilation
    cmd = [sys.executable, "-m", "npgpt", "bench", "--grid", "1x1,2x1", "--n-layer", "1", "--n-embd", "32",
           "--n-head", "2", "--n-vocab", "101", "--n-ctx", "16", "--batch", "4", "--context", "16", "--steps", "2",
           "--timeout", "300", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["cpu"] and report["blas"] and (report["batch"], report["context"]) == (4, 16)
    one, two = report["grid"]
    assert (one["ranks"], one["threads"], two["ranks"], two["threads"]) == (1, 1, 2, 1)
    n1, n2 = one["rounds"][0]["npgpt"], two["rounds"][0]["npgpt"]
    assert n1["ranks"] == 1 and n1["bytes_per_rank_per_step"] == 0 and n1["allreduce_in_step_s"] == 0
    assert n2["ranks"] == 2 and n2["bytes_per_rank_per_step"] == 4 * n2["params"]    # float32: every gradient summed
    assert n2["buckets_in_backward"] >= 1 and len(n2["allreduce_in_step_by_rank_s"]) == 2
    for row, run in ((one, n1), (two, n2)):
        assert 0 < run["seconds"] < 60 and row["npgpt"]["tokens_per_s"] == 4 * 16 / run["seconds"]
        assert 0 <= run["allreduce_in_step_s"] < run["seconds"]
    assert (report["best"]["npgpt"]["ranks"], report["best"]["npgpt"]["threads"]) in ((1, 1), (2, 1))
    table = grid_table(report).splitlines()
    assert table[2].startswith("| 1 x 1 | ") and table[3].startswith("| 2 x 1 | ") and "%)" in table[3]


def test_ctrl_c_in_the_bench_ends_the_jobs_it_started(monkeypatch):
    """The grid's jobs run in their own sessions (so that a hung one can be ended as a group), out of the
    terminal's Ctrl-C: a KeyboardInterrupt while the bench waits for them ends them before it propagates.
    (The interrupt comes from the first poll of a job, as a Ctrl-C would during the wait.)"""
    from npgpt import bench
    started = []

    class Interrupted(subprocess.Popen):
        first = [True]

        def poll(self):
            if self.first.pop() if self.first else False:
                raise KeyboardInterrupt
            return super().poll()

    def recording(*args, **kwargs):
        started.append(Interrupted(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", recording)
    job = ([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    with pytest.raises(KeyboardInterrupt):
        bench._launch([job, job], timeout=120)
    assert len(started) == 2
    for p in started:
        p.wait(timeout=10)                                  # ended, not left sleeping for a minute
