"""fastneg's NTXentLoss and SupConLoss against pytorch-metric-learning's own classes (pinned in the
test environment): same embeddings, same labels; the loss and the embeddings' gradient must agree,
in float64 and float32, over several label layouts, with ``ref_emb``, other reducers, and a
training step of a small model."""

from __future__ import annotations

import warnings

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

from fastneg.integrations import pytorch_metric_learning as fpml  # noqa: E402


@pytest.fixture(autouse=True, params=["auto", "portable"])
def fused_backend(request, monkeypatch) -> str:  # noqa: ANN001
    """Every test twice: the backend ``auto`` picks here (the C++ kernels), and the portable one
    (what ``auto`` picks on MPS, XPU or without a compiler), through FASTNEG_BACKEND."""
    monkeypatch.setenv("FASTNEG_BACKEND", request.param)
    return request.param

NAMES = ["NTXentLoss", "SupConLoss"]
LABELS = {
    "pairs": lambda n: torch.arange(n) // 2,                      # SimCLR's two views per image
    "classes of 3": lambda n: torch.arange(n) % max(n // 3, 1),
    "singletons and a big class": lambda n: torch.where(torch.arange(n) < n // 2, 0, torch.arange(n)),
    "all one class": lambda n: torch.zeros(n, dtype=torch.long),
    "all singletons": lambda n: torch.arange(n),
    "random": lambda n: torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(5)),
}


def _run(loss_fn, emb, labels, **kw):
    emb = emb.detach().clone().requires_grad_()
    ref = kw.pop("ref_emb", None)
    if ref is not None:
        ref = ref.detach().clone().requires_grad_()
    value = loss_fn(emb, labels, ref_emb=ref, **kw)
    grads = torch.autograd.grad(value, [emb] + ([ref] if ref is not None else []), allow_unused=True)
    grads = [torch.zeros_like(emb) if g is None else g for g in grads]
    return value.detach(), grads


def _assert_same(ours, theirs, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours[0], theirs[0], rtol=tol, atol=tol)
    for a, b in zip(ours[1], theirs[1]):
        scale = float(b.abs().max()) + 1e-30
        assert float((a - b).abs().max()) <= tol * max(scale, 1.0), (float((a - b).abs().max()), scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(LABELS))
@pytest.mark.parametrize("name", NAMES)
def test_matches_the_original(name, layout, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(24, 8, generator=g, dtype=dtype)
    labels = LABELS[layout](24)
    kw = dict(temperature=0.2)
    ours = _run(getattr(fpml, name)(**kw), emb, labels)
    theirs = _run(getattr(pml_losses, name)(**kw), emb, labels)
    _assert_same(ours, theirs, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_ref_emb_different_from_embeddings(name) -> None:
    g = torch.Generator().manual_seed(1)
    emb, ref = torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randn(15, 6, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, 3, (10,), generator=g), torch.randint(0, 3, (15,), generator=g)
    ours = _run(getattr(fpml, name)(), emb, labels, ref_emb=ref, ref_labels=ref_labels)
    theirs = _run(getattr(pml_losses, name)(), emb, labels, ref_emb=ref, ref_labels=ref_labels)
    _assert_same(ours, theirs, torch.float64)
    # ref_emb given as the embeddings themselves (another object): the original keeps the self pairs
    ours = _run(getattr(fpml, name)(), emb, labels, ref_emb=emb, ref_labels=labels.clone())
    theirs = _run(getattr(pml_losses, name)(), emb, labels, ref_emb=emb, ref_labels=labels.clone())
    _assert_same(ours, theirs, torch.float64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("setting", ["dot product", "unnormalised dot product", "mean reducer", "threshold reducer"])
def test_distances_and_reducers(name, setting) -> None:
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(16, 5, generator=g, dtype=torch.float64) * 0.3
    labels = torch.arange(16) % 5
    kw = {
        "dot product": dict(distance=pml_distances.DotProductSimilarity()),
        "unnormalised dot product": dict(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False)),
        "mean reducer": dict(reducer=pml_reducers.MeanReducer()),
        "threshold reducer": dict(reducer=pml_reducers.ThresholdReducer(low=0.5)),
    }[setting]
    ours = _run(getattr(fpml, name)(temperature=0.3, **kw), emb, labels)
    theirs = _run(getattr(pml_losses, name)(temperature=0.3, **{k: v for k, v in kw.items()}), emb, labels)
    _assert_same(ours, theirs, torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_unfused_options_fall_back_to_the_original(name) -> None:
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(12) % 4
    fpml._warned.clear()
    with pytest.warns(UserWarning, match="quadratic"):
        ours = _run(getattr(fpml, name)(distance=pml_distances.LpDistance()), emb, labels)
    theirs = _run(getattr(pml_losses, name)(distance=pml_distances.LpDistance()), emb, labels)
    _assert_same(ours, theirs, torch.float64)
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    pairs = MultiSimilarityMiner()(emb, labels)
    with pytest.warns(UserWarning, match="indices_tuple"):
        ours = _run(getattr(fpml, name)(), emb, labels, indices_tuple=pairs)
    theirs = _run(getattr(pml_losses, name)(), emb, labels, indices_tuple=pairs)
    _assert_same(ours, theirs, torch.float64)


def test_same_label_pairs_order_matches_torch_where() -> None:
    g = torch.Generator().manual_seed(4)
    labels, ref_labels = torch.randint(0, 5, (30,), generator=g), torch.randint(0, 5, (40,), generator=g)
    for lab, ref, self_pairs in ((labels, ref_labels, False), (labels, labels, True)):
        matches = lab[:, None] == ref[None, :]
        if self_pairs:
            matches.fill_diagonal_(False)
        a, p = torch.where(matches)
        ours = fpml.same_label_pairs(lab, ref, exclude_self=self_pairs)
        assert torch.equal(ours[0], a) and torch.equal(ours[1], p)


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_of_a_small_model(name) -> None:
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
    model_b = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).double()
    model_b.load_state_dict(model_a.state_dict())
    x = torch.randn(32, 10, dtype=torch.float64)
    y = torch.arange(32) // 4
    for model, cls in ((model_a, getattr(fpml, name)), (model_b, getattr(pml_losses, name))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            cls(temperature=0.1)(model(x), y).backward()
            opt.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", NAMES)
def test_memory_stays_linear_at_batch_8192(name, fused_backend, monkeypatch) -> None:  # noqa: ANN001
    """Batch 8192, 2 views per class: the fused loss allocates no B x B matrix (the original's
    float32 distance matrix alone is 256 MiB, its pair masks as much again). The portable backend
    runs with a 32 MiB budget for its chunks."""
    from fastneg.tools.profiling import peak_memory

    if fused_backend == "portable":
        monkeypatch.setenv("FASTNEG_PORTABLE_MEMORY_MB", "32")
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(8192, 32, generator=g).requires_grad_()
    labels = torch.arange(8192) // 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, not a fallback
        with peak_memory("cpu") as peak:
            getattr(fpml, name)()(emb, labels).backward()
    try:  # the measure can fail: the original's peak, same call (NT-Xent's pair masks need 512 GB here)
        with peak_memory("cpu") as original:
            getattr(pml_losses, name)()(emb, labels).backward()
        original_mib = original.mib
    except RuntimeError as exc:
        assert "allocate" in str(exc)
        original_mib = float("inf")
    assert peak.mib < 64 < 256 < original_mib, (peak.mib, original_mib)
