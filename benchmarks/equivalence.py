"""Outputs of this checkout on a fixed set of problems, to compare two builds bit for bit.

    python benchmarks/equivalence.py save OUT.pt [--backends cpu,reference,triton]
    python benchmarks/equivalence.py compare A.pt B.pt

``save`` runs every rule mode (margins, labels, guides, each weighting and estimator, soft
labels, symmetric, attraction, exclusions) forward and backward on each backend (float64 and
float32; Triton in float32 under ``TRITON_INTERPRET=1`` without a GPU) and the sampler's three
strategies, and stores the loss, the stats and the gradients of query, keys and temperature.
``compare`` prints every tensor that differs and by how much. Run ``save`` once per build
(``PYTHONPATH`` pointing at the other tree) to check that a refactor preserves behaviour.
"""

from __future__ import annotations

import argparse
import os

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save")
    s.add_argument("out")
    s.add_argument("--backends", default="cpu,reference,triton")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    if args.command == "save":
        save(args.out, args.backends.split(","))
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    raise SystemExit(main())
