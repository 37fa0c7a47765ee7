"""fastneg's ClipLoss against open_clip's own ``ClipLoss`` (open-clip-torch pinned in the test
environment), on one process and on real gloo process groups with ``local_loss`` and
``gather_with_grad``: loss and the gradients of both feature sets and of ``logit_scale``.

open_clip's package imports torchvision, which has no CPU build for the pinned torch; its loss
module imports only torch, so the test loads ``open_clip/loss.py`` from the installed distribution
when the package import fails (the same file, unchanged)."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import socket
import sys
import tempfile
import traceback
from importlib import metadata
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastneg.integrations.open_clip import ClipLoss


@pytest.fixture(autouse=True, params=["auto", "portable"])
def fused_backend(request, monkeypatch) -> str:  # noqa: ANN001
    """Every test twice: the backend ``auto`` picks here (the C++ kernels), and the portable one
    (what ``auto`` picks on MPS, XPU or without a compiler), through FASTNEG_BACKEND."""
    monkeypatch.setenv("FASTNEG_BACKEND", request.param)
    return request.param


def original_loss_module():
    try:
        return importlib.import_module("open_clip.loss")
    except Exception:  # noqa: BLE001 - e.g. torchvision missing: load the module file itself
        try:
            dist_files = metadata.distribution("open_clip_torch").files or []
        except metadata.PackageNotFoundError:
            pytest.skip("open-clip-torch is not installed")
        path = next(f for f in dist_files if str(f).replace("\\", "/") == "open_clip/loss.py").locate()
        spec = importlib.util.spec_from_file_location("open_clip_loss_original", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _features(B: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.7 * torch.randn(B, D, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _loss_and_grads(loss_fn, img, txt, scale, bias=None, **kw):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    leaves = [img, txt, scale]
    if bias is not None:
        bias = bias.clone().requires_grad_()
        leaves.append(bias)
    loss = loss_fn(img, txt, scale, bias, **kw)
    if isinstance(loss, dict):
        loss = loss["contrastive_loss"]
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 7, 64])
def test_one_process_matches_open_clip(B, dtype) -> None:
    original = original_loss_module().ClipLoss()
    img, txt = _features(B, 16, dtype)
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    ours = _loss_and_grads(ClipLoss(), img, txt, scale)
    theirs = _loss_and_grads(original, img, txt, scale)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(ours[0], theirs[0], rtol=tol, atol=tol)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def test_logit_bias_and_output_dict() -> None:
    original = original_loss_module().ClipLoss()
    img, txt = _features(12, 8, torch.float64)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours = _loss_and_grads(ClipLoss(), img, txt, scale, bias, output_dict=True)
    theirs = _loss_and_grads(original, img, txt, scale, bias, output_dict=True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_duplicate_captions_masked_by_label() -> None:
    """Two images with the same caption: with labels, neither is the other's negative (both ways)."""
    img, txt = _features(6, 8, torch.float64)
    txt = txt.clone()
    txt[3] = txt[1]
    labels = torch.tensor([0, 1, 2, 1, 4, 5])
    scale = torch.tensor(10.0, dtype=torch.float64)
    got = ClipLoss()(img, txt, scale, labels=labels)
    logits = scale * img @ txt.T
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(6, dtype=torch.bool)
    masked = logits.masked_fill(same, float("-inf"))
    want = (torch.nn.functional.cross_entropy(masked, torch.arange(6))
            + torch.nn.functional.cross_entropy(masked.T, torch.arange(6))) / 2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert float(got) < float(ClipLoss()(img, txt, scale))


def test_a_training_step_of_a_small_model() -> None:
    torch.manual_seed(0)
    towers = [torch.nn.Linear(10, 8, dtype=torch.float64) for _ in range(2)]
    copies = [torch.nn.Linear(10, 8, dtype=torch.float64) for _ in range(2)]
    for a, b in zip(towers, copies):
        b.load_state_dict(a.state_dict())
    log_scale = [torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64)) for _ in range(2)]
    x_img, x_txt = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 10, dtype=torch.float64)
    for (img_tower, txt_tower), ls, loss_fn in (((towers[0], towers[1]), log_scale[0], ClipLoss()),
                                                ((copies[0], copies[1]), log_scale[1], original_loss_module().ClipLoss())):
        params = list(img_tower.parameters()) + list(txt_tower.parameters()) + [ls]
        opt = torch.optim.SGD(params, lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            img = torch.nn.functional.normalize(img_tower(x_img), dim=-1)
            txt = torch.nn.functional.normalize(txt_tower(x_txt), dim=-1)
            loss_fn(img, txt, ls.exp()).backward()
            opt.step()
    for a, b in zip(list(towers[0].parameters()) + list(towers[1].parameters()) + [log_scale[0]],
                    list(copies[0].parameters()) + list(copies[1].parameters()) + [log_scale[1]]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# --- several ranks ------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, B: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        original = original_loss_module()
        img_all, txt_all = _features(B * world, 8, torch.float64, seed=3)
        img, txt = img_all[rank * B:(rank + 1) * B], txt_all[rank * B:(rank + 1) * B]
        scale = torch.tensor(14.0, dtype=torch.float64)
        result: dict[str, Any] = {}
        for local_loss in (False, True):
            for with_grad in (False, True):
                kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
                ours = _loss_and_grads(ClipLoss(**kw), img, txt, scale)
                theirs = _loss_and_grads(original.ClipLoss(**kw), img, txt, scale)
                result[(local_loss, with_grad)] = (ours, theirs)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_match_open_clip(world: int) -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(world, _free_port(), 5, out_dir), nprocs=world, join=True)
        except mp.ProcessExitedException:
            if not all(os.path.exists(os.path.join(out_dir, f"{r}.pt")) for r in range(world)):
                raise
        results = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]
    for rank, result in enumerate(results):
        for setting, (ours, theirs) in result.items():
            torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-10, msg=f"rank {rank} {setting}")
            for a, b in zip(ours[1], theirs[1]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"rank {rank} {setting}")
