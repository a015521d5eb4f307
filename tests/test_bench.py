"""`npgpt bench` runs end to end on a tiny config and reports what it promises (figures, BLAS, JSON)."""
import json
import subprocess
import sys


def test_bench_json_tiny_config():
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "256", "--workloads", "train", "train-loop", "prefill", "decode", "startup",
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
    assert 0 < res["startup"]["npgpt"]["warm_first_token_s"] < 60
    loop = res["train-loop"]["npgpt"]                       # the training loop's overhead over a bare step
    assert loop["tokens_per_s"] > 0 and loop["bare_tokens_per_s"] > 0 and loop["overhead"] > -1
    assert "torch" not in res["train"]                      # no --compare: npgpt alone


def test_bench_weights_int8_decode_batch():
    cmd = [sys.executable, "-m", "npgpt", "bench", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
           "--n-vocab", "101", "--n-ctx", "256", "--workloads", "prefill", "decode", "--weights", "int8",
           "--decode-batch", "3", "--reps", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["options"]["weights"] == "int8" and report["options"]["decode_B"] == 3
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
