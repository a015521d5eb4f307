"""A soak of `npgpt serve`: several clients send a mix of good and bad requests for a while; every good
request must get its right answer, every bad one its error status, and the server must neither die
nor grow (threads, resident memory).

    PYTHONPATH=. python examples/serve_soak.py [--seconds 60] [--clients 6] [--parallel 4] [--model DIR]

It starts `python -m npgpt serve` on 127.0.0.1 (a free port, an API key, --max-tokens 24) with the
model (default tests/fixtures/tiny_hf, whose prompts must use GPT-2 ids below 101), computes each good
request's answer once alone, warms every path up once, notes the server's thread count and RSS
(/proc/PID/status), then lets the clients loose. Each client repeats, at random:

    good   a greedy completion; the same streamed (openai client); n=2 with a seed; logprobs=2
    bad    malformed JSON (400), a wrong type (400), a prompt longer than the context (400),
           max_tokens above the cap (400), a wrong API key (401), a 2 MiB body (413),
           a streamed request whose client hangs up after the first chunk

At the end: every good answer equals its reference, every bad status is the expected one, the server
is still up, its thread count is the baseline's, and its RSS grew by less than --rss-slack MiB after
the first 10 s (half the run, if shorter). Prints the tallies and PASS or FAIL (exit status 0 or 1).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import httpx
import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-soak"
PROMPTS = ["1+1=2", "2+2=4", "3", "9-9", "=1=", "[1]", "1+2+3=6", "x=y"]


def start_server(model, parallel):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "serve", "--model", model, "--port", "0", "--parallel",
                             str(parallel), "--api-key", KEY, "--max-tokens", "24"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()      # keep draining
            return proc, m.group(1)
    raise SystemExit("npgpt serve did not start")


def proc_status(pid) -> tuple:
    """(threads, RSS in MiB) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


class Soak:
    """The clients' actions, their references and tallies."""

    def __init__(self, url):
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.http = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        self.tally = collections.Counter()
        self.failures = []
        self.lock = threading.Lock()
        self.ref = {}
        for p in PROMPTS:                                        # each good answer, computed alone
            self.ref[("greedy", p)] = self.greedy(p)
            self.ref[("n2", p)] = self.n2(p)
            self.ref[("logprobs", p)] = self.logprobs(p)

    # good requests -> their answers
    def greedy(self, p):
        return self.client.completions.create(model="m", prompt=p, max_tokens=16, temperature=0).choices[0].text

    def streamed(self, p):
        return "".join(c.choices[0].text for c in self.client.completions.create(
            model="m", prompt=p, max_tokens=16, temperature=0, stream=True))

    def n2(self, p):
        r = self.client.completions.create(model="m", prompt=p, max_tokens=10, n=2, seed=11, temperature=1.0)
        return [c.text for c in sorted(r.choices, key=lambda c: c.index)]

    def logprobs(self, p):
        r = self.client.completions.create(model="m", prompt=p, max_tokens=5, temperature=0, logprobs=2)
        return [round(v, 3) for v in r.choices[0].logprobs.token_logprobs]

    GOOD = {"greedy": ("greedy", greedy), "streamed": ("greedy", streamed), "n2": ("n2", n2),
            "logprobs": ("logprobs", logprobs)}

    # bad requests -> (body, headers, the status they must get)
    def bad(self, kind):
        p = random.choice(PROMPTS)
        cases = {"malformed": (b'{"prompt": ', {}, 400),
                 "type": (json.dumps({"prompt": p, "temperature": "hot"}), {}, 400),
                 "too_long": (json.dumps({"prompt": "1+" * 20}), {}, 400),
                 "over_cap": (json.dumps({"prompt": p, "max_tokens": 25}), {}, 400),
                 "key": (json.dumps({"prompt": p}), {"Authorization": "Bearer sk-wrong"}, 401),
                 "huge": (json.dumps({"prompt": p, "pad": "x" * (2 << 20)}), {}, 413)}
        body, headers, status = cases[kind]
        r = self.http.post(self.url + "/v1/completions", content=body,
                           headers={"Content-Type": "application/json", **headers})
        return r.status_code == status and "error" in r.json(), f"{kind}: {r.status_code} {r.text[:200]}"

    def hang_up(self):
        body = {"prompt": random.choice(PROMPTS), "max_tokens": 20, "temperature": 1.0, "stream": True}
        with self.http.stream("POST", self.url + "/v1/completions", json=body) as r:
            ok = r.status_code == 200 and next(r.iter_lines()).startswith("data: ")
        return ok, "hang_up: no first chunk"

    def one(self, rng):
        """One random action; tallies it."""
        kind = rng.choice(list(self.GOOD) * 2 + ["malformed", "type", "too_long", "over_cap", "key", "huge",
                                                  "hang_up"])
        try:
            if kind in self.GOOD:
                ref_kind, fn = self.GOOD[kind]
                p = rng.choice(PROMPTS)
                got = fn(self, p)
                ok, why = got == self.ref[(ref_kind, p)], f"{kind} {p!r}: {got!r} != {self.ref[(ref_kind, p)]!r}"
            elif kind == "hang_up":
                ok, why = self.hang_up()
            else:
                ok, why = self.bad(kind)
        except Exception as e:  # noqa: BLE001  (a client error is a failure to report, not a crash)
            ok, why = False, f"{kind}: {type(e).__name__}: {e}"
        with self.lock:
            self.tally[(kind, ok)] += 1
            if not ok:
                self.failures.append(why)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "tests", "fixtures", "tiny_hf"))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rss-slack", type=float, default=16.0, help="MiB the RSS may grow after the first 10 s")
    args = ap.parse_args()

    proc, url = start_server(args.model, args.parallel)
    try:
        soak = Soak(url)
        rng = random.Random(0)
        for kind in ("malformed", "type", "too_long", "over_cap", "key", "huge"):
            soak.bad(kind)
        soak.hang_up()
        soak.streamed(PROMPTS[0])
        time.sleep(0.5)
        threads0, rss0 = proc_status(proc.pid)
        samples, stop = [(0.0, rss0)], time.time() + args.seconds
        t_start = time.time()

        def client(seed):
            r = random.Random(seed)
            while time.time() < stop:
                soak.one(r)
        workers = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(args.clients)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            time.sleep(min(1.0, args.seconds / 10))
            samples.append((time.time() - t_start, proc_status(proc.pid)[1]))
        for w in workers:
            w.join()
        deadline = time.time() + 10
        while soak.http.get(url + "/health").json()["slots_processing"] and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        threads1, rss1 = proc_status(proc.pid)
        alive = proc.poll() is None and soak.greedy(PROMPTS[0]) == soak.ref[("greedy", PROMPTS[0])]
    finally:
        proc.terminate()
        proc.wait(15)

    good = sum(n for (k, ok), n in soak.tally.items() if k in soak.GOOD and ok)
    good_all = sum(n for (k, _), n in soak.tally.items() if k in soak.GOOD)
    bad = sum(n for (k, ok), n in soak.tally.items() if k not in soak.GOOD and ok)
    bad_all = sum(soak.tally.values()) - good_all
    t_settle = min(10.0, args.seconds / 2)
    settle = min((r for t, r in samples if t >= t_settle), default=rss0)
    grew = rss1 - settle
    print(f"{args.seconds:g} s, {args.clients} clients, --parallel {args.parallel}: "
          f"{good}/{good_all} good requests answered right, {bad}/{bad_all} bad ones got their status")
    for (kind, ok), n in sorted(soak.tally.items()):
        print(f"    {kind:<9} {'ok' if ok else 'FAILED':<6} {n}")
    print(f"server threads {threads0} -> {threads1}; RSS {rss0:.1f} -> {rss1:.1f} MiB "
          f"(at {t_settle:g} s: {settle:.1f}; grew {grew:+.1f} MiB since)")
    print("RSS over the run: " + ", ".join(f"{t:.0f} s {r:.1f}" for t, r in samples[::max(1, len(samples) // 8)]))
    for why in soak.failures[:10]:
        print("  failure:", why)
    passed = alive and not soak.failures and good_all > 0 and threads1 == threads0 and grew < args.rss_slack
    print("PASS" if passed else "FAIL" + ("" if alive else " (the server died or answered wrong at the end)"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
