"""Gathered negatives on real gloo process groups (2 and 4 CPU processes) against one process on
the concatenated global batch: the loss averaged over ranks is the global loss, and the gradients
after DistributedDataParallel's averaging are the global gradients. Hard-negative columns,
labels, margin and SimANS on; uneven local batches, including a rank with no rows."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastneg

D_IN, D = 12, 16
HARD = 2  # hard-negative columns
OPTIONS: dict[str, Any] = dict(temperature=0.1, margin=0.3, weighting=fastneg.SimANS(a=1.0, b=0.1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(total: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randn(total, D_IN, generator=g, dtype=torch.float64)
    x_d = [x_q + 0.5 * torch.randn(total, D_IN, generator=g, dtype=torch.float64) for _ in range(1 + HARD)]
    labels = [torch.randint(0, max(2, total // 2), (total,), generator=g) for _ in range(1 + HARD)]
    return {"x_q": x_q, "x_d": torch.stack(x_d), "labels": torch.stack(labels)}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D, dtype=torch.float64)


def _embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(model(x), dim=-1)


def _reference(sizes: list[int], symmetric: bool = False) -> tuple[float, list[torch.Tensor]]:
    """One process, the whole batch: keys laid out as positives of all rows, then each hard column."""
    batch = _global_batch(sum(sizes))
    model = _model()
    q = _embed(model, batch["x_q"])
    keys = torch.cat([_embed(model, x) for x in batch["x_d"]])
    loss = fastneg.info_nce(q, keys, key_labels=batch["labels"].reshape(-1), symmetric=symmetric, **OPTIONS)
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters()]


def _worker(rank: int, world: int, port: int, sizes: list[int], mode: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a bounded timeout: a rank that dies must fail the test, not hang it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        batch = _global_batch(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        model = torch.nn.parallel.DistributedDataParallel(_model())
        n = hi - lo
        # one forward (DDP's reducer expects one per backward): queries, positives, hard columns
        emb = _embed(model, torch.cat([batch["x_q"][lo:hi]] + [x[lo:hi] for x in batch["x_d"]]))
        q, keys = emb[:n], emb[n:]  # local keys: positives, then each hard column
        labels = batch["labels"][:, lo:hi].reshape(-1)
        result: dict[str, Any] = {}
        if mode in ("train", "train-symmetric"):
            loss = fastneg.info_nce(q, keys, key_labels=labels, process_group=dist.group.WORLD, key_blocks=1 + HARD,
                                    symmetric=mode == "train-symmetric", **OPTIONS)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            result = {"loss": float(total) / world, "grads": [p.grad.clone() for p in model.parameters()]}
        elif mode == "compile":  # the gather and the fused op in one compiled graph, equal sizes given
            from fastneg.parallel.gather import all_gather_with_grad

            def step(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
                gathered = all_gather_with_grad(k, sizes=[k.shape[0]] * world)
                return fastneg.info_nce(q, gathered, torch.arange(q.shape[0]) + rank * k.shape[0], temperature=0.1)

            q0, k0 = q.detach().float(), keys[: q.shape[0]].detach().float()
            leaves = [t.clone().requires_grad_() for t in (q0, k0, q0, k0)]
            eager = step(leaves[0], leaves[1])
            eager.backward()
            compiled = torch.compile(step, fullgraph=True)(leaves[2], leaves[3])
            compiled.backward()
            result = {"loss": (float(eager), float(compiled.detach())),
                      "grads": [(leaves[i].grad, leaves[i + 2].grad) for i in (0, 1)]}
        elif mode == "disagree":  # rank 1 uses another dtype
            try:
                qq, kk = (q.float(), keys.float()) if rank == 1 else (q, keys)
                fastneg.info_nce(qq, kk, process_group=dist.group.WORLD, key_blocks=1 + HARD)
                result = {"error": None}
            except ValueError as exc:
                result = {"error": str(exc)}
        elif mode == "bad_rank":  # rank 0 passes an out-of-range positive
            try:
                pos = torch.full((q.shape[0],), 10**6 if rank == 0 else 0, dtype=torch.long)
                fastneg.info_nce(q, keys, pos, process_group=dist.group.WORLD, key_blocks=1 + HARD)
                result = {"error": None}
            except ValueError as exc:
                result = {"error": str(exc)}
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # every rank has written its result
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without the interpreter's teardown: gloo's and DDP's background threads racing the
    # destructors at exit can abort a finished process ("terminate called without an active exception").
    os._exit(0)


def _run(sizes: list[int], mode: str) -> list[dict[str, Any]]:
    world = len(sizes)
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_worker, args=(world, _free_port(), sizes, mode, out_dir), nprocs=world, join=True)
        except mp.ProcessExitedException:
            # a signal after every rank wrote its result and passed the final barrier is a teardown
            # problem, not a wrong result; anything earlier fails the test
            if not all(os.path.exists(os.path.join(out_dir, f"{r}.pt")) for r in range(world)):
                raise
        return [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("sizes", [[6, 6], [5, 3], [4, 4, 4, 4], [4, 0, 6, 2]],
                         ids=["2-even", "2-uneven", "4-even", "4-uneven-with-empty-rank"])
def test_gathered_loss_and_ddp_gradients_equal_the_global_batch(sizes: list[int], symmetric: bool) -> None:
    ref_loss, ref_grads = _reference(sizes, symmetric)
    results = _run(sizes, "train-symmetric" if symmetric else "train")
    for r, res in enumerate(results):
        assert res["loss"] == pytest.approx(ref_loss, rel=1e-10, abs=1e-12), f"rank {r}"
        for got, want in zip(res["grads"], ref_grads):
            assert float((got - want).abs().max()) <= 1e-10 * max(1.0, float(want.abs().max())), f"rank {r}"
    # the check can fail: without the gather (local negatives only) the gradients differ
    assert any(float(g.abs().max()) > 0 for g in ref_grads)


def test_gather_compiles_with_the_fused_op() -> None:
    """torch.compile(fullgraph=True) over the gather and the loss: same loss and gradients as eager."""
    for res in _run([4, 4], "compile"):
        eager, compiled = res["loss"]
        assert compiled == pytest.approx(eager, rel=1e-6)
        for a, b in res["grads"]:
            assert float((a - b).abs().max()) < 1e-5


def test_ranks_that_disagree_all_raise() -> None:
    results = _run([3, 3], "disagree")
    for res in results:
        assert res["error"] is not None and "disagree on dtype" in res["error"]


def test_a_rank_that_rejects_its_inputs_does_not_hang_the_others() -> None:
    results = _run([3, 3], "bad_rank")
    assert results[0]["error"] is not None and "positives" in results[0]["error"]
    assert results[1]["error"] is not None and "rank(s) [0]" in results[1]["error"]


def test_all_gather_with_grad_is_the_identity_without_a_process_group() -> None:
    from fastneg.parallel.gather import all_gather_with_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
