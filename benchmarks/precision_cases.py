"""The precision figures quoted in docs/reference.md and in the HCL / GCSE docstrings, recomputed.

    python benchmarks/precision_cases.py

1. Ties at a threshold: the float64 64 x 16 problem with an exact copy of the positive key
   (k[5] = k[0], every positive 0) at margin 0: on which rows each backend masks the copy.
2. HCL with DCL: the fused float32 error against float64 as a multiple of dense float32's, worst
   over 48 problems (with and without unmasked exact duplicates).
3. Soft labels with SimANS (a up to 3000, teacher temperature 0.02 to 1, margin or none): the
   fused float32 loss error as a multiple of dense float32's, worst over 288 problems.
4. HCL and HCL + DCL, a random search (``--hcl-trials``, default 3000; ``--hcl-backends``,
   default cpu and portable: triton runs under the interpreter, slowly): B <= 8, N <= 16, D <= 6,
   queries near their positive (noise 0.01 to 3), exact and near copies of positives, beta in
   {-0.5, 0.5, 1, 3}, tau+ in {none, 0, 0.1, 0.5}, labels, relative margins, temperatures
   2^-8 to 1/4. Each problem is posed on its float32 scores (query = the score matrix, keys = the
   identity, temperatures powers of two), so every backend sees the same exact logits and only the
   loss's arithmetic differs. Per backend: the worst over problems and over loss, dq and dk of its
   float32 error against float64 divided by the dense float32 loss's (floored at 1e-7 of the
   gradient's scale); problems whose DCL clamp sits within 1e-4 of its floor, relative to the terms
   it subtracts, are skipped (a tie decided by the rounding). ``--hcl-weighting none``: the same
   search for DCL alone.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random

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


def _hcl_problem(rng: random.Random, seed: int, hcl: bool = True) -> tuple:
    g = torch.Generator().manual_seed(seed)
    B = rng.randint(1, 8)
    N = rng.randint(max(B, 2), 16)
    D = rng.randint(1, 6)
    keys = unit(N, D, g)
    pos = torch.randperm(N, generator=g)[:B]
    noise = rng.choice([0.01, 0.05, 0.3, 1.0, 3.0])
    query = torch.nn.functional.normalize(keys[pos] + noise * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    for _ in range(rng.randint(0, 3)):
        src, dst = int(pos[rng.randrange(B)]), rng.randrange(N)
        if dst not in pos.tolist():
            near = torch.nn.functional.normalize(keys[src] + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64), dim=0)
            keys[dst] = keys[src] if rng.random() < 0.5 else near
    scores = (query.float() @ keys.float().T).double()  # the problem on its float32 scores: q' = S, k' = I
    kw = dict(temperature=rng.choice([2.0 ** -8, 2.0 ** -7, 2.0 ** -6, 2.0 ** -5, 0.25]),
              weighting=fastneg.HCL(rng.choice([0.5, 1.0, 3.0] + ([-0.5] if rng.random() < 0.1 else []))) if hcl else None,
              debias=rng.choice([None, 0.0, 0.1, 0.5]))
    if rng.random() < 0.5:
        kw["key_labels"] = torch.randint(0, max(1, N // 2), (N,), generator=g)
        if rng.random() < 0.5:
            kw["query_labels"] = torch.randint(0, max(1, N // 2), (B,), generator=g)
    if rng.random() < 0.3:
        kw["relative_margin"] = rng.choice([0.0, 0.05])
    return scores, torch.eye(N, dtype=torch.float64), pos, kw, torch.rand(B, generator=g, dtype=torch.float64) + 0.5


def hcl_search(trials: int, backends: list[str], hcl: bool = True) -> None:
    worst: dict[str, tuple[float, str]] = {b: (0.0, "") for b in backends}
    rng, skipped = random.Random(0), 0
    for trial in range(trials):
        query, keys, pos, kw, w = _hcl_problem(rng, trial, hcl)

        def run(dtype: torch.dtype, backend: str, query=query, keys=keys, pos=pos, kw=kw, w=w) -> list:  # noqa: ANN001
            q = query.to(dtype).detach().clone().requires_grad_()
            k = keys.to(dtype).detach().clone().requires_grad_()
            loss, stats = fastneg.info_nce(q, k, pos, backend=backend, reduction="none", return_stats=True,
                                           **{**kw, "temperature": torch.tensor(kw["temperature"], dtype=dtype)})
            (loss * w.to(dtype)).sum().backward()
            return [loss.detach().double(), q.grad.double(), k.grad.double(), stats]

        truth = run(torch.float64, "reference")
        if kw["debias"] is not None:  # DCL's clamp within 1e-4 of its floor: a tie, decided by the last bit
            tau_plus, t = kw["debias"], kw["temperature"]
            _, plain_stats = fastneg.info_nce(query, keys, pos, backend="reference", reduction="none", return_stats=True,
                                              **{**kw, "debias": None})
            lp, n = plain_stats.positive_logit, plain_stats.num_negatives.double()
            mass = torch.expm1(plain_stats.logsumexp - lp)  # the negatives' term over e^{l+}
            raw = (mass - n * tau_plus) / (1.0 - tau_plus)
            floor = n * torch.exp(-1.0 / t - lp)
            terms = (mass + n * tau_plus) / (1.0 - tau_plus)  # what raw subtracts: raw itself may be a cancellation
            gap = torch.where(n > 0, (raw - floor).abs() / (terms + floor), torch.ones_like(n))
            if bool((gap < 1e-4).any()):
                skipped += 1
                continue
        dense = run(torch.float32, "reference")
        gscale = max(float(truth[1].abs().max()), float(truth[2].abs().max()), 1.0)
        for backend in backends:
            got = run(torch.float32, backend)
            for name, t_, d_, f in zip(("loss", "dq", "dk"), truth, dense, got):
                size = max(float(t_.abs().max()), 1.0) if name == "loss" else gscale
                ratio = float((f - t_).abs().max()) / max(float((d_ - t_).abs().max()), 1e-7 * size)
                if ratio > worst[backend][0]:
                    worst[backend] = (ratio, f"problem {trial}, {name}, t {kw['temperature']:g}, {kw['weighting']}, "
                                             f"tau+ {kw['debias']}")
    for backend, (ratio, where) in worst.items():
        print(f"{'hcl' if hcl else 'dcl'} search, {trials - skipped} problems ({skipped} DCL ties skipped): {backend} "
              f"worst error / dense "
              f"float32's = {ratio:.1f} ({where})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hcl-trials", type=int, default=3000)
    parser.add_argument("--hcl-backends", default="cpu,portable")
    parser.add_argument("--hcl-weighting", choices=["hcl", "none"], default="hcl")
    args = parser.parse_args()
    ties()
    hcl()
    soft_simans()
    hcl_search(args.hcl_trials, args.hcl_backends.split(","), args.hcl_weighting == "hcl")
