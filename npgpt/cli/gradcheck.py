"""`npgpt gradcheck`: every layer and a whole tiny GPT against finite differences, as a table."""
from __future__ import annotations


def add_parser(sub):
    g = sub.add_parser("gradcheck", help="check every layer's backward and the whole model against finite differences")
    g.add_argument("--kernels", choices=["numpy", "numba", "both"], default="both",
                   help="which kernel backend to check (default both)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random test inputs (default 0)")
    g.set_defaults(func=run)


def run(args) -> int:
    from .. import fast
    from ..gradcheck import check_everything, format_table
    ok = True
    for backend in (["numpy", "numba"] if args.kernels == "both" else [args.kernels]):
        with fast.use_backend(backend):
            results = check_everything(seed=args.seed)
        print(f"gradient check, float64, fourth-order central differences, kernels={backend}")
        print(format_table(results))
        passed = sum(r.passed for r in results)
        print(f"{passed}/{len(results)} PASS\n")
        ok &= passed == len(results)
    return 0 if ok else 1
