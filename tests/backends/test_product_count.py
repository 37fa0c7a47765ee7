"""The Triton design's cost as a number: one forward+backward of the op does 4 B x N x D matrix
products (q k^T in the forward; in the backward one recomputation of the score tiles and the two
products dS k, dS^T q), plus the positives' gathered tiles (B x BLOCK_M x D), at every D, for
every mode. Counted under the interpreter with a compute-capability-9 GPU's tile shape
(``fastneg.tools.profiling.triton_products``), with a workspace that forces several backward panels.
benchmarks/count_products.py writes the full table."""

import pytest
import torch

import fastneg
from fastneg.backends.triton import cuda_block_config
from fastneg.tools.profiling import count_matmul_work, triton_products

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counts tl.dot under the Triton interpreter")

B = N = 256
GUIDE_WIDTH = 192
BLOCK_M = cuda_block_config(64, torch.float32, 9).block_m  # the row block of float32 on compute capability 9

MODES = {
    "plain": {},
    "masked SimANS": dict(query_labels="random", relative_margin=0.05, weighting=fastneg.SimANS()),
    "DCL": dict(debias=0.1),
    "HCL+DCL": dict(weighting=fastneg.HCL(1.0), debias=0.1),
    "GCSE": dict(weighting=fastneg.GCSE(), guide_width=GUIDE_WIDTH, guide_margin=None),
    "soft labels": dict(soft_labels=fastneg.SoftLabels(weight=0.5), guide_width=GUIDE_WIDTH, guide_margin=None),
    "symmetric": dict(symmetric=True),
}
WIDE = {"plain", "masked SimANS", "symmetric"}  # also at D = 4096 (the interpreter's time grows with D)


def cases():
    for mode in MODES:
        for D in (64, 768, 4096):
            if D < 4096 or mode in WIDE:
                yield pytest.param(mode, D, id=f"{mode}-D{D}")


@pytest.mark.parametrize("mode,D", list(cases()))
def test_four_products_per_forward_backward(mode, D, monkeypatch):
    monkeypatch.setenv("FASTNEG_TRITON_WORKSPACE_MB", "0")  # one row block per panel: two panels
    options = dict(MODES[mode])
    work = triton_products(B, N, D, torch.float32, **options)
    guide = work.sum(width=GUIDE_WIDTH) if "guide_width" in options else 0
    positives = work.sum(site="positives") - work.sum(site="positives", width=GUIDE_WIDTH)
    products = work.total - guide - positives
    assert work.aten == 0
    assert products == 4 * B * N * D, {k: v / (B * N * D) for k, v in work.by_site.items()}
    assert positives == B * BLOCK_M * D
    if "guide_width" in options:  # the guide's tiles: forward and the backward's recomputation
        assert guide == 2 * B * N * GUIDE_WIDTH + B * BLOCK_M * GUIDE_WIDTH
    # every kernel that multiplies: forward, dS, dq, dk (and, symmetric, the rows' state first: positives only)
    kernels = {kernel for kernel, site, _ in work.by_site if site == "tiles"}
    assert kernels == {"_info_nce_fwd_kernel", "_info_nce_bwd_ds_kernel", "_panel_dq_kernel", "_panel_dk_kernel"}
    gathered = {kernel for kernel, site, _ in work.by_site if site == "positives"}
    assert gathered == {"_info_nce_row_state_kernel" if options.get("symmetric") else "_info_nce_fwd_kernel"}


def test_half_precision_tiles_count_the_same():
    work = triton_products(B, N, 768, torch.float16, weighting=fastneg.SimANS(), symmetric=True)
    assert work.total - work.sum(site="positives") == 4 * B * N * 768


def test_small_width_is_not_padded():
    """D = 16: the reduction tile shrinks to 16 (a tl.dot's smallest K), so no product is padded."""
    work = triton_products(B, N, 16, torch.float16)
    assert work.total - work.sum(site="positives") == 4 * B * N * 16


def test_the_counter_counts_aten_products():
    a, b = torch.randn(8, 5), torch.randn(5, 3)
    with count_matmul_work() as work:
        a @ b
    assert work.aten == 8 * 5 * 3 and work.by_site == {}
