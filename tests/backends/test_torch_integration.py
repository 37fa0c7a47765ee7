"""The op as a torch citizen: opcheck, torch.compile, autograd corner cases, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastneg
from fastneg.backends import cpu as cpu_backend
from fastneg.backends.portable import info_nce_bwd_portable, info_nce_fwd_portable
from fastneg.plan import Flag, Plan, Weighting
from helpers import TRITON_DEVICE, make_problem, max_error

# the op's rule modes: (weighting, weight_a, weight_b, debias, soft_temperature, soft_weight, exclude, attract)
MODES = {
    "one-way": (Weighting.SIMANS, 0.5, 0.1, None, None, 1.0, False, False),
    "symmetric": (Weighting.SIMANS, 0.5, 0.1, None, None, 1.0, False, False),
    "debias": (Weighting.SIMANS, 0.5, 0.1, 0.1, None, 1.0, False, False),
    "hcl": (Weighting.HCL, 1.0, 0.0, 0.1, None, 1.0, False, False),
    "gcse": (Weighting.GCSE, 2.0, 0.0, None, None, 1.0, False, False),
    "soft": (Weighting.SIMANS, 0.5, 0.1, None, 0.1, 0.5, False, False),
    "exclude": (Weighting.SIMANS, 0.5, 0.1, None, None, 1.0, True, False),
    "attract": (Weighting.SIMANS, 0.5, 0.1, None, None, 1.0, True, True),
}


def mode_plan(mode: str) -> Plan:
    weighting, a, b, debias, soft_t, soft_w, _, attract = MODES[mode]
    return Plan(margin=0.1, relative_margin=0.05, max_score=2.0, guide_margin=0.0, weighting=weighting, weight_a=a,
                weight_b=b, debias=debias, soft_temperature=soft_t, soft_weight=soft_w, attract=attract)


def fwd_args(B=12, N=20, D=8, dtype=torch.float32, device="cpu", guide=True, labels=True, mode="one-way"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g, dtype=dtype).to(device).requires_grad_()
    k = torch.randn(N, D, generator=g, dtype=dtype).to(device).requires_grad_()
    pos = torch.randperm(N, generator=g)[:B].to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    temp = torch.tensor(0.1, dtype=acc, device=device if device != "cpu" else "cpu").requires_grad_()
    klab = torch.randint(0, 5, (N,), generator=g).to(device) if labels else None
    qlab = klab[pos] if labels else None
    gq = torch.randn(B, 4, generator=g, dtype=dtype).to(device) if guide else None
    gk = torch.randn(N, 4, generator=g, dtype=dtype).to(device) if guide else None
    excl = (pos + 1) % N if MODES[mode][6] else None  # never the row's own positive
    plan = mode_plan(mode)
    return (q, k, pos, temp, qlab, klab, gq, gk, excl, plan.scalars(), plan.flags(symmetric=mode == "symmetric"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_opcheck_cpu_forward(dtype, extras, mode) -> None:
    if mode in ("gcse", "soft") and not extras:
        pytest.skip("GCSE and soft labels need the guide")
    cpu_backend.load()
    args = fwd_args(dtype=dtype, guide=extras, labels=extras, mode=mode)
    torch.library.opcheck(torch.ops.fastneg.info_nce_fwd_cpu.default, args)


def fused_ops(backend: str) -> tuple:
    if backend == "cpu":
        cpu_backend.load()
        return torch.ops.fastneg.info_nce_fwd_cpu.default, torch.ops.fastneg.info_nce_bwd_cpu.default
    return info_nce_fwd_portable, info_nce_bwd_portable


def backward_args(forward, args) -> tuple:
    """The backward op's arguments after ``forward(*args)``: every gradient asked for."""
    with torch.no_grad():
        out = forward(*args)
    q, k, pos, temp, qlab, klab, gq, gk, excl, scalars, flags = args
    return (torch.rand(q.shape[0]), q.detach(), k.detach(), pos, temp.detach(), qlab, klab, gq, gk, excl, out[1],
            scalars, flags | Flag.QUERY_GRAD | Flag.KEYS_GRAD | Flag.TEMPERATURE_GRAD)


@pytest.mark.parametrize("backend", ["cpu", "portable"])
@pytest.mark.parametrize("mode", list(MODES))
def test_opcheck_backward(mode, backend) -> None:
    forward, backward = fused_ops(backend)
    bwd_args = backward_args(forward, fwd_args(mode=mode))
    torch.library.opcheck(backward, bwd_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", list(MODES))
def test_opcheck_portable_forward(dtype, mode) -> None:
    torch.library.opcheck(info_nce_fwd_portable, fwd_args(dtype=dtype, mode=mode))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter on CPU tensors")
def test_triton_fake_backward_under_the_interpreter() -> None:
    """The Triton backward's fake kernel gives its per-row sums the dtype the op returns on CPU
    tensors under the interpreter (float32; it said float64 from the device)."""
    pytest.importorskip("triton")
    import fastneg.backends.triton  # noqa: F401

    forward, backward = torch.ops.fastneg.info_nce_fwd_triton.default, torch.ops.fastneg.info_nce_bwd_triton.default
    bwd_args = backward_args(forward, fwd_args(guide=False))
    assert backward(*bwd_args)[2].dtype == torch.float32
    torch.library.opcheck(backward, bwd_args, test_utils=("test_faketensor",))


@pytest.mark.gpu
def test_opcheck_triton() -> None:
    import fastneg.backends.triton  # noqa: F401

    torch.library.opcheck(torch.ops.fastneg.info_nce_fwd_triton.default, fwd_args(device="cuda"))
    for mode in ("symmetric", "hcl", "soft", "attract"):
        torch.library.opcheck(torch.ops.fastneg.info_nce_fwd_triton.default, fwd_args(device="cuda", mode=mode))


@pytest.mark.parametrize("backend", ["cpu", "auto", "portable"])
def test_torch_compile_fullgraph(backend) -> None:
    torch._dynamo.reset()
    problem = make_problem(24, 48, 16, seed=1)
    labels = torch.arange(48) % 7

    def step(q, k, pos, t):
        return fastneg.info_nce(q, k, pos, temperature=t, key_labels=labels, margin=0.1,
                                weighting=fastneg.SimANS(), backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    outs = []
    for fn in (step, compiled):
        q = problem.query.float().requires_grad_()
        k = problem.keys.float().requires_grad_()
        t = torch.tensor(0.05, requires_grad=True)
        loss = fn(q, k, problem.positives, t)
        loss.backward()
        outs.append((loss.detach(), q.grad, k.grad, t.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "portable"])
def test_every_requires_grad_combination(backend) -> None:
    problem = make_problem(10, 25, 6, seed=2)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    full = None
    for need_q, need_k, need_t in itertools.product([False, True], repeat=3):
        q = problem.query.float().to(device).requires_grad_(need_q)
        k = problem.keys.float().to(device).requires_grad_(need_k)
        t = torch.tensor(0.05, device=device, requires_grad=need_t)
        loss = fastneg.info_nce(q, k, problem.positives.to(device), temperature=t, margin=0.2,
                                weighting="simans", backend=backend)
        grads = (q.grad, k.grad, t.grad)
        if need_q or need_k or need_t:
            loss.backward()
            grads = (q.grad, k.grad, t.grad)
        else:
            assert not loss.requires_grad
        for flag, g in zip((need_q, need_k, need_t), grads):
            assert (g is not None) == flag
        if need_q and need_k and need_t:
            full = grads
    # the partial runs' gradients equal the full run's
    for need_q, need_k in ((True, False), (False, True)):
        q = problem.query.float().to(device).requires_grad_(need_q)
        k = problem.keys.float().to(device).requires_grad_(need_k)
        fastneg.info_nce(q, k, problem.positives.to(device), margin=0.2, weighting="simans",
                         backend=backend).backward()
        got = q.grad if need_q else k.grad
        assert torch.equal(got, full[0] if need_q else full[1])


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "portable"])
def test_deterministic(backend, symmetric) -> None:
    problem = make_problem(70, 300, 20, seed=3)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    runs = []
    for _ in range(2):
        q = problem.query.float().to(device).requires_grad_()
        k = problem.keys.float().to(device).requires_grad_()
        loss = fastneg.info_nce(q, k, problem.positives.to(device), weighting="simans", margin=0.1, backend=backend,
                                symmetric=symmetric)
        loss.backward()
        runs.append((loss.detach(), q.grad, k.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_module_with_learnable_temperature() -> None:
    problem = make_problem(16, 32, 8, seed=4)
    loss_fn = fastneg.InfoNCE(temperature=torch.nn.Parameter(torch.tensor(0.1)), margin=0.1,
                              weighting=fastneg.SimANS())
    assert isinstance(loss_fn.temperature, torch.nn.Parameter)
    assert any(p is loss_fn.temperature for p in loss_fn.parameters())
    q = problem.query.float().requires_grad_()
    loss = loss_fn(q, problem.keys.float(), problem.positives)
    loss.backward()
    expected = fastneg.info_nce(problem.query.float(), problem.keys.float(), problem.positives, temperature=0.1,
                                margin=0.1, weighting=fastneg.SimANS())
    assert torch.allclose(loss.detach(), expected)
    assert loss_fn.temperature.grad is not None and torch.isfinite(loss_fn.temperature.grad)
    assert "margin=0.1" in repr(loss_fn)


def test_stats_are_consistent() -> None:
    problem = make_problem(20, 50, 8, seed=5)
    loss, stats = fastneg.info_nce(problem.query.float(), problem.keys.float(), problem.positives, margin=0.0,
                                   reduction="none", return_stats=True)
    assert torch.allclose(loss, stats.logsumexp - stats.positive_logit, atol=1e-6)
    assert torch.equal(stats.num_masked + stats.num_negatives, torch.full((20,), 49))
    assert stats.num_masked.dtype == torch.int64


def test_cpu_backend_results_do_not_depend_on_row_block_split() -> None:
    # the same rows, alone or inside a larger batch, get the same loss bits (rows are independent)
    problem = make_problem(130, 200, 12, seed=6)
    q, k, p = problem.query.float(), problem.keys.float(), problem.positives
    full = fastneg.info_nce(q, k, p, reduction="none", margin=0.05, weighting="simans")
    part = fastneg.info_nce(q[64:128], k, p[64:128], reduction="none", margin=0.05, weighting="simans")
    assert max_error(part, full[64:128]) == 0.0


def test_generic_and_avx2_cpu_kernel_builds_agree() -> None:
    # the element-wise kernels exist in two builds; force the generic one in a fresh process
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch, fastneg\n"
            "g = torch.Generator().manual_seed(0)\n"
            "q = torch.nn.functional.normalize(torch.randn(70, 40, generator=g), dim=-1).requires_grad_()\n"
            "k = torch.nn.functional.normalize(torch.randn(300, 40, generator=g), dim=-1).requires_grad_()\n"
            "l = fastneg.info_nce(q, k, margin=0.3, weighting='simans', key_labels=torch.arange(300) % 50,"
            " reduction='none')\n"
            "l.sum().backward()\n"
            "print(json.dumps([l.tolist(), q.grad.flatten().tolist(), k.grad.flatten().tolist()]))\n")
    outs = []
    for kernels in ("generic", "auto"):
        env = dict(os.environ, FASTNEG_CPU_KERNELS=kernels)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        outs.append([torch.tensor(v) for v in json.loads(out.stdout)])
    for a, b in zip(*outs):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(a.abs().max()))


def test_torch_compile_fullgraph_estimators() -> None:
    torch._dynamo.reset()
    problem = make_problem(24, 48, 16, seed=2, guide_dim=8)
    gq, gk = problem.extra["guide_query"], problem.extra["guide_keys"]

    def step(q, k):
        return (fastneg.info_nce(q, k, weighting=fastneg.HCL(1.0), debias=0.1)
                + fastneg.info_nce(q, k, guide_query=gq, guide_keys=gk, guide_margin=None,
                                   weighting=fastneg.GCSE(2.0), soft_labels=fastneg.SoftLabels(0.1, 0.5)))

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        q, k = problem.query.clone().requires_grad_(), problem.keys.clone().requires_grad_()
        loss = fn(q, k)
        results.append((loss.detach(), *torch.autograd.grad(loss, (q, k))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
