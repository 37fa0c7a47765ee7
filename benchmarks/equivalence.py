"""Outputs of this checkout on a fixed set of problems, to compare two builds bit for bit.

    python benchmarks/equivalence.py save OUT.pt [--backends cpu,reference,triton]
    python benchmarks/equivalence.py compare A.pt B.pt
    python benchmarks/equivalence.py api OUT.json      # the public names and their signatures
    python benchmarks/equivalence.py compare-api A.json B.json

``save`` runs every rule mode (margins, labels, guides, each weighting and estimator, soft
labels, symmetric, attraction, exclusions) forward and backward on each backend (float64 and
float32; Triton in float32 under ``TRITON_INTERPRET=1`` without a GPU) and the sampler's three
strategies, and stores the loss, the stats and the gradients of query, keys and temperature.
``compare`` prints every tensor that differs and by how much. Run ``save`` once per build
(``PYTHONPATH`` pointing at the other tree) to check that a refactor preserves behaviour.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastneg  # noqa: E402


def problems() -> dict[str, dict]:
    g = torch.Generator().manual_seed(0)
    B, N = 37, 53
    gq, gk = torch.randn(B, 16, generator=g), torch.randn(N, 16, generator=g)
    labels = torch.randint(0, 6, (N,), generator=g)
    guide = dict(guide_query=gq, guide_keys=gk)
    return {
        "plain": {}, "margin": dict(margin=0.1), "relative_margin+simans": dict(relative_margin=0.05, weighting="simans"),
        "labels+max_score": dict(key_labels=labels, max_score=0.5), "hardness": dict(weighting=fastneg.Hardness(2.0)),
        "guide": dict(guide, guide_margin=0.1), "guide_relative": dict(guide, guide_margin=0.1, guide_strategy="relative"),
        "gcse": dict(guide, guide_margin=None, weighting=fastneg.GCSE(2.0)),
        "guide_hardness": dict(guide, guide_margin=None, weighting=fastneg.Hardness(1.5, on="guide")),
        "hcl": dict(weighting=fastneg.HCL(1.0), margin=0.2), "debias": dict(debias=0.1, margin=0.1, weighting="simans"),
        "soft": dict(guide, guide_margin=None, soft_labels=fastneg.SoftLabels(0.1, 0.5), weighting="simans"),
        "symmetric": dict(symmetric=True, margin=0.1, weighting="simans", key_labels=labels),
        "attract": dict(false_negatives="attract", margin=0.1, key_labels=labels, weighting="simans"),
        "exclude": dict(exclude=(torch.arange(B) + 1) % N, margin=0.1),
    }


def save(path: str, backends: list[str]) -> None:
    g = torch.Generator().manual_seed(1)
    q0 = torch.nn.functional.normalize(torch.randn(37, 24, generator=g), dim=1)
    k0 = torch.nn.functional.normalize(torch.randn(53, 24, generator=g), dim=1)
    k0[5] = k0[3]  # an exact duplicate key
    labels = torch.randint(0, 6, (53,), generator=g)
    out: dict[str, list[torch.Tensor]] = {}
    for backend in backends:
        for dtype in [torch.float64, torch.float32] if backend != "triton" else [torch.float32]:
            for name, opts in problems().items():
                q, k = q0.to(dtype).clone().requires_grad_(), k0.to(dtype).clone().requires_grad_()
                t = 0.05 if "debias" in opts else torch.tensor(0.05, dtype=dtype, requires_grad=True)
                opts = {n: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for n, v in opts.items()}
                loss, stats = fastneg.info_nce(q, k, temperature=t, backend=backend, return_stats=True,
                                               reduction="none", **opts)
                loss.sum().backward()
                grads = [q.grad, k.grad] + ([t.grad] if isinstance(t, torch.Tensor) else [])
                out[f"{backend}/{dtype}/{name}"] = [loss.detach(), *stats[:4], *grads]
        for strategy in ("top", "simans", "uniform"):
            out[f"{backend}/sample/{strategy}"] = [fastneg.sample_negatives(
                q0, k0, None, 5, strategy=strategy, seed=3, margin=0.1, key_labels=labels, backend=backend)]
    torch.save(out, path)
    print(f"{len(out)} cases saved to {path}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    if a.keys() != b.keys():
        print(f"different cases: {sorted(set(a) ^ set(b))}")
        return 1
    differ = 0
    for case in a:
        for i, (x, y) in enumerate(zip(a[case], b[case])):
            if x is None or y is None:  # a gradient that does not exist in one of the builds
                if (x is None) != (y is None):
                    print(f"{case} output {i}: missing in one build")
                    differ += 1
                continue
            if not torch.equal(x, y):
                gap = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else int((x != y).sum())
                print(f"{case} output {i}: max difference {gap:.3g}")
                differ += 1
    print(f"{len(a)} cases, {sum(len(v) for v in a.values())} tensors, {differ} differ")
    return 0


PUBLIC_MODULES = ("fastneg", "fastneg.presets", "fastneg.cached", "fastneg.integrations.sentence_transformers",
                  "fastneg.integrations.pytorch_metric_learning", "fastneg.integrations.open_clip")


def api(path: str) -> None:
    """Every public name of the documented modules with its signature (default-value reprs of
    functions, which hold addresses, are cut to their names)."""
    out = {}
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")]):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                sig = type(obj).__name__
            out[f"{name}.{attr}"] = re.sub(r"<function (\w+) at 0x[0-9a-f]+>", r"<function \1>", sig)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"{len(out)} public names saved to {path}")


def compare_api(a_path: str, b_path: str) -> int:
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            print(f"{name}:\n  {a.get(name, '(absent)')}\n  {b.get(name, '(absent)')}")
    print(f"{len(a)} and {len(b)} names, {sum(a.get(n) != b.get(n) for n in set(a) | set(b))} differ")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("out")
    s.add_argument("--backends", default="cpu,reference,triton")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    p = sub.add_parser("api")
    p.add_argument("out")
    ca = sub.add_parser("compare-api")
    ca.add_argument("a")
    ca.add_argument("b")
    args = parser.parse_args()
    if args.command == "save":
        save(args.out, args.backends.split(","))
        return 0
    if args.command == "api":
        api(args.out)
        return 0
    if args.command == "compare-api":
        return compare_api(args.a, args.b)
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
