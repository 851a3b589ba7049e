"""The flat gradient bucket that replaces DDP's hooks in the DreamBooth step (eager and captured): two gloo processes
on the CPU run the static step (what the CUDA graph replays, uncaptured here) over halves of a global batch and must
end where one process ends on the whole batch.

Tolerance: 1e-6 on float32 weights and losses (the two halves' gradients are summed in another order than one
process sums the whole batch's); the two ranks must agree exactly. The steps use SGD with momentum: Adam divides by
the root of tiny second moments, which turns float32 rounding of near-zero gradients into 1e-4 weight differences
even on one process (one batch of 4 against two halves of 2 accumulated), and would hide the bucket's arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_vision.training.sd.loop import all_agree, graph_off_reason
from lora_vision.training.sd.config import SDTrainConfig
from lora_vision.training.sd.step import GradientBucket, StaticStep, gather_inputs, shard_inputs, step_loss

from test_train_sd_parts import _setup

ROWS = [torch.tensor([0, 2, 1, 4]), torch.tensor([1, 4, 3, 3]), torch.tensor([3, 0, 2, 1])]


def _train(rank: int, world: int) -> tuple[list[float], list[torch.Tensor]]:
    """Three static steps over ROWS' global batches, this process on its slice; (losses, LoRA weights)."""
    unet, params, _, cache, table, settings, ac = _setup()
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(7)  # the same global noise and timesteps on every process

    def loss_fn(x):
        return step_loss(unet, x, table, [], ac, settings, torch.float32)

    example = shard_inputs(gather_inputs([(cache, ROWS[0])], torch.Generator().manual_seed(99), settings), rank, world)
    bucket = GradientBucket(params, world) if world > 1 else None
    step = StaticStep(loss_fn, params, opt, 1.0, example, bucket)
    losses = []
    for rows in ROWS:
        step.load(shard_inputs(gather_inputs([(cache, rows)], gen, settings), rank, world))
        losses.append(float(step.run()))
    return losses, [p.detach().clone() for p in params]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        torch.save(_train(rank, world), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_static_step_on_two_processes_equals_one_process_at_twice_the_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    (l0, w0), (l1, w1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(w0, w1)), "the two ranks hold different LoRA weights"
    losses, weights = _train(0, 1)
    assert max(float(w.abs().max()) for w in weights[1::2]) > 1e-4, "B never moved: the comparison proves nothing"
    assert max(float((a - b).abs().max()) for a, b in zip(w0, weights)) <= 1e-6
    # each process logs the loss of its half; their mean is the loss of the whole batch
    assert [(a + b) / 2 for a, b in zip(l0, l1)] == pytest.approx(losses, abs=1e-6)


def _bucket_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        unet, params, opt, cache, table, settings, ac = _setup()
        bucket = GradientBucket(params, world)
        [flat] = bucket.flats
        x = shard_inputs(gather_inputs([(cache, ROWS[0])], torch.Generator().manual_seed(7), settings), rank, world)
        seen = []
        for _ in range(2):  # twice: the second step finds the gradients where the first left them
            bucket.attach()
            step_loss(unet, x, table, [], ac, settings, torch.float32).backward()
            bucket.all_reduce()
            seen.append({p.grad.data_ptr() for p in params if p.grad is not None})
            opt.zero_grad(set_to_none=True)  # what clip_and_step does: attach() puts the views back
        ptrs = range(flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size())
        # a capture that failed on one process only: every process hears of it (else the others would wait in the
        # graph's all-reduce for a process that runs the eager step)
        agreed = all_agree(rank == 0, torch.device("cpu")), all_agree(True, torch.device("cpu"))
        torch.save({"inside": all(p in ptrs for p in seen[0]), "same": seen[0] == seen[1], "count": len(seen[0]),
                    "flat": flat.clone(), "agreed": agreed}, Path(folder) / f"bucket{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bucket_gradients_live_in_one_flat_buffer_and_are_averaged(tmp_path):
    mp.spawn(_bucket_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"bucket{r}.pt") for r in (0, 1))
    assert r0["inside"] and r0["same"] and r0["count"] == len(_setup()[1])
    assert torch.equal(r0["flat"], r1["flat"])  # both hold the average, not their own half
    assert r0["agreed"] == r1["agreed"] == (False, True)
    # the average of the halves' gradients is the whole batch's gradient (one process, no bucket)
    unet, params, opt, cache, table, settings, ac = _setup()
    x = gather_inputs([(cache, ROWS[0])], torch.Generator().manual_seed(7), settings)
    step_loss(unet, x, table, [], ac, settings, torch.float32).backward()
    whole = torch.cat([p.grad.reshape(-1) for p in params])
    assert float(whole.abs().max()) > 0
    torch.testing.assert_close(r0["flat"], whole, rtol=0, atol=1e-6)


def test_several_processes_no_longer_turn_the_cuda_graph_off():
    # the step's all-reduce is the bucket's, inside the graph: world > 1 is no reason to run the eager step
    assert graph_off_reason(SDTrainConfig(), torch.device("cuda"), True, torch.bfloat16) is None
    assert "gradient accumulation" in graph_off_reason(SDTrainConfig(gradient_accumulation_steps=2),
                                                       torch.device("cuda"), True, torch.bfloat16)
