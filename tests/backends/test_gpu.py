"""GPU tier: the Triton kernels on CUDA in every dtype, and a problem with B x N > 2^31.

(The correctness and integration suites also run their Triton cases on CUDA when it is present.)
"""

from __future__ import annotations

import pytest
import torch

import fastneg
from helpers import build, check, make_problem, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 90, 19), (300, 1000, 300), (513, 2049, 768)])
def test_triton_cuda_all_rules(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    B, N, D = shape
    problem, options = build("all_rules_simans", B, N, D, seed=B, duplicates=4, peaked=True)
    check(problem, "triton", dtype, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_backend_on_cuda(dtype: torch.dtype) -> None:
    problem, options = build("margin", 200, 400, 64)
    check(problem, "auto", dtype, **options)


def test_fully_masked_rows_on_cuda_bf16() -> None:
    problem = make_problem(64, 128, 32, seed=3)
    got = run(problem, "triton", torch.bfloat16, device="cuda", margin=10.0)
    assert torch.equal(got.loss, torch.zeros(64))
    assert torch.equal(got.dq, torch.zeros_like(got.dq))


def test_more_than_2_to_the_31_score_elements() -> None:
    # B x N = 48000 x 48000 = 2.3e9 > 2^31: int64 offsets. Checked row-block by row-block
    # against the dense reference (which fits for a slice of rows).
    B = N = 48_000
    D = 16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=g), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(N, D, device="cuda", generator=g), dim=-1).bfloat16()
    q.requires_grad_()
    loss, stats = fastneg.info_nce(q, k, margin=0.1, weighting="simans", reduction="none", return_stats=True)
    loss.sum().backward()
    for rows in (slice(0, 256), slice(B - 256, B)):
        pos = torch.arange(B, device="cuda")[rows]
        ref = fastneg.info_nce(q.detach()[rows].double(), k.double(), pos, margin=0.1, weighting="simans",
                               reduction="none", backend="reference")
        assert torch.allclose(loss[rows].double(), ref, atol=2e-2, rtol=2e-2)
    assert bool(torch.isfinite(q.grad).all())
