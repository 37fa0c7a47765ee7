"""The precision figures quoted in docs/reference.md and in the HCL / GCSE docstrings, recomputed.

    python benchmarks/precision_cases.py

1. Ties at a threshold: the float64 64 x 16 problem with an exact copy of the positive key
   (k[5] = k[0], every positive 0) at margin 0: on which rows each backend masks the copy.
2. HCL with DCL: the fused float32 error against float64 as a multiple of dense float32's, worst
   over 48 problems (with and without unmasked exact duplicates).
3. Soft labels with SimANS (a up to 3000, teacher temperature 0.02 to 1, margin or none): the
   fused float32 loss error as a multiple of dense float32's, worst over 288 problems.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fastneg  # noqa: E402


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def ties() -> None:
    q = unit(64, 16, torch.Generator().manual_seed(13))
    k = unit(16, 16, torch.Generator().manual_seed(14))
    k[5] = k[0]
    positives = torch.zeros(64, dtype=torch.long)
    s = q @ k.T
    others = ((s > s[:, :1]) & (torch.arange(16) != 5) & (torch.arange(16) != 0)).sum(1)
    for backend in ("cpu", "reference"):
        _, stats = fastneg.info_nce(q, k, positives, margin=0.0, return_stats=True, reduction="none", backend=backend)
        rows = (stats.num_masked - others).nonzero().flatten().tolist()
        print(f"ties: {backend}: the exact copy is masked at margin 0 on rows {rows}")


def hcl() -> None:
    """Worst ratio over 48 problems (seeds 0-2, temperature 0.005 / 0.05, beta 1 / 3, tau+ 0 / 0.1,
    with and without exact duplicates), over loss, dq and dk, of the fused float32 error to dense
    float32's (floored at 1e-6 of the quantity's size)."""
    worst = (0.0, None)
    for seed, t, beta, tau_plus, dup in itertools.product(range(3), [0.005, 0.05], [1.0, 3.0], [0.0, 0.1],
                                                          [False, True]):
        torch.manual_seed(seed)
        q = torch.nn.functional.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)
        k = torch.nn.functional.normalize(torch.randn(40, 8, dtype=torch.float64), dim=1)
        if dup:
            k[20], k[21] = k[3], k[0]

        def run(dtype: torch.dtype, backend: str, q=q, k=k, t=t, beta=beta, tau_plus=tau_plus) -> tuple:  # noqa: ANN001
            qq, kk = q.to(dtype).detach().clone().requires_grad_(), k.to(dtype).detach().clone().requires_grad_()
            loss = fastneg.info_nce(qq, kk, temperature=t, weighting=fastneg.HCL(beta), debias=tau_plus,
                                    backend=backend, reduction="sum")
            loss.backward()
            return loss.double(), qq.grad.double(), kk.grad.double()

        truth, plain, fused = run(torch.float64, "reference"), run(torch.float32, "reference"), run(torch.float32, "cpu")
        for name, r, p_, f in zip(("loss", "dq", "dk"), truth, plain, fused):
            ratio = float((f - r).abs().max()) / max(float((p_ - r).abs().max()), 1e-6 * float(r.abs().max()))
            if ratio > worst[0]:
                worst = (ratio, f"{name} at seed {seed}, t {t}, beta {beta}, tau+ {tau_plus}, duplicates {dup}")
    print(f"hcl: worst fused / dense float32 error ratio {worst[0]:.1f} ({worst[1]})")


def soft_simans() -> None:
    worst: dict[str, tuple[float, float]] = {}
    cases = 0
    for seed, a, b, teacher_t, B, N, margin in itertools.product(
            range(2), [30.0, 300.0, 3000.0], [0.0, -0.2], [0.02, 0.05, 1.0], [3, 8], [8, 20], [None, 0.05]):
        g = torch.Generator().manual_seed(seed)
        keys = unit(N, 6, g)
        positives = torch.randperm(N, generator=g)[:B]
        query = torch.nn.functional.normalize(keys[positives] + 0.3 * torch.randn(B, 6, generator=g, dtype=torch.float64), dim=1)
        guide = torch.nn.functional.normalize(query + 0.2 * torch.randn(B, 6, generator=g, dtype=torch.float64), dim=1)
        kw = dict(temperature=0.05, weighting=fastneg.SimANS(a, b), soft_labels=fastneg.SoftLabels(teacher_t, 1.0),
                  margin=margin, reduction="none")

        def loss(dtype: torch.dtype, backend: str, query=query, keys=keys, positives=positives, guide=guide,  # noqa: ANN001
                 kw=kw) -> torch.Tensor:
            return fastneg.info_nce(query.to(dtype), keys.to(dtype), positives, guide_query=guide.to(dtype),
                                    guide_keys=keys.to(dtype), backend=backend, **kw).double()

        truth = loss(torch.float64, "reference")
        plain = float((loss(torch.float32, "reference") - truth).abs().max())
        cases += 1
        for backend in ("cpu", "triton"):
            got = loss(torch.float32, backend)
            err = float((got - truth).abs().max())
            ratio = err / (plain + 1e-7)
            if ratio > worst.get(backend, (0.0,))[0]:
                worst[backend] = (ratio, err, plain, float(got.min()), a)
    for backend, (ratio, err, plain, smallest, a) in worst.items():
        print(f"soft labels + SimANS, {cases} problems: {backend} worst error / (dense float32's + 1e-7) = {ratio:.0f} "
              f"(error {err:.2g}, dense {plain:.2g}, a = {a:g}; smallest KL {smallest:.3g})")


if __name__ == "__main__":
    ties()
    hcl()
    soft_simans()
