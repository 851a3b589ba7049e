"""The capturable Prodigy, schedule-free AdamW and Adafactor (training/optim_graph.py) against the packages they
re-implement: the same parameters after each step, checkpoints that load across, and a resume equal to an unbroken
run. Parameters of LoRA shapes (several of one shape, so they stack), a 4-d conv factor and a 1-d bias."""

from __future__ import annotations

import pytest
import torch

from lora_vision.training.checkpoint import _join_optimizer, _split_optimizer
from lora_vision.training.optim import LRSchedule
from lora_vision.training.optim_graph import AdamWScheduleFree, Adafactor, Prodigy

prodigyopt = pytest.importorskip("prodigyopt")
schedulefree = pytest.importorskip("schedulefree")

SHAPES = [(4, 16), (4, 16), (24, 4), (24, 4), (4, 8, 3, 3), (24,), (4, 16)]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    with torch.no_grad():
        params[2].zero_()  # a LoRA B starts at zero (Prodigy keeps p0 as a scalar for it)
    return params


def grads_for(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    # gradients that depend on the parameters too, so a wrong update changes later gradients
    return [torch.randn(p.shape, generator=g) * 0.01 + 0.05 * p.detach() for p in params]


def groups_of(params, lrs):
    return [{"params": params[:4], "lr": lrs[0]}, {"params": params[4:], "lr": lrs[1]}]


CASES = {
    "prodigy": (lambda gs: prodigyopt.Prodigy(gs, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8),
                lambda gs: Prodigy(gs, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8), (1.0, 1.0)),
    "schedulefree": (lambda gs: schedulefree.AdamWScheduleFree(gs, betas=(0.9, 0.999), weight_decay=0.01,
                                                               eps=1e-8, warmup_steps=3),
                     lambda gs: AdamWScheduleFree(gs, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8,
                                                  warmup_steps=3), (1e-2, 3e-2)),
    "adafactor": (lambda gs: torch.optim.Adafactor(gs, weight_decay=0.01, foreach=False),
                  lambda gs: Adafactor(gs, weight_decay=0.01), (0.5, 3e-2)),  # 1/sqrt(t) < 0.5 after step 4
}


def run(make, lrs, steps, params=None, opt=None, start=0, schedule=None):
    params = params if params is not None else make_params()
    opt = opt if opt is not None else make(groups_of(params, lrs))
    if hasattr(opt, "train"):
        opt.train()
    history = []
    for step in range(start, start + steps):
        if schedule is not None:
            schedule.apply(opt, list(lrs), step)
        for p, g in zip(params, grads_for(step, params)):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append([p.detach().clone() for p in params])
    return params, opt, history


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_steps_as_the_package(name):
    reference, ours, lrs = CASES[name]
    schedule = LRSchedule("cosine", warmup_steps=2, total_steps=12)
    _, ref_opt, ref = run(reference, lrs, 12, schedule=schedule)
    _, our_opt, mine = run(ours, lrs, 12, schedule=schedule)
    for step, (a, b) in enumerate(zip(ref, mine)):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=2e-5, atol=1e-7, msg=f"{name} step {step}")
    moved = min(float((x - p.detach()).abs().max()) for x, p in zip(ref[-1], make_params()) if p.any())
    assert moved > 1e-5, "a parameter did not move: the comparison says nothing about it"
    if name == "prodigy":  # the step-size estimate itself
        assert our_opt.state_dict()["param_groups"][0]["d"] == pytest.approx(ref_opt.param_groups[0]["d"], rel=1e-5)
        assert ref_opt.param_groups[0]["d"] > 1e-6  # it grew from d0
    if name == "schedulefree":  # the averaged point, in eval mode
        ref_opt.eval(), our_opt.eval()
        torch.testing.assert_close([p.detach() for g in our_opt.param_groups for p in g["params"]],
                                   [p.detach() for g in ref_opt.param_groups for p in g["params"]],
                                   rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("direction", ["package_to_ours", "ours_to_package"])
def test_checkpoint_loads_across(name, direction):
    """A checkpoint written through the recipes' checkpoint split (safetensors + JSON) by one implementation
    resumes in the other to the unbroken run's parameters."""
    reference, ours, lrs = CASES[name]
    first, second = (reference, ours) if direction == "package_to_ours" else (ours, reference)
    _, _, unbroken = run(reference, lrs, 8)
    params, opt, _ = run(first, lrs, 4)
    if hasattr(opt, "eval"):
        opt.eval()  # the recipes save in eval mode
    tensors, meta = _split_optimizer(opt)
    saved = [p.detach().clone() for p in params]
    fresh = make_params(seed=5)  # other values: everything must come from the checkpoint
    with torch.no_grad():
        for p, s in zip(fresh, saved):
            p.copy_(s)
    opt2 = second(groups_of(fresh, lrs))
    if hasattr(opt2, "eval"):
        opt2.eval()
    opt2.load_state_dict(_join_optimizer(tensors, meta))
    _, _, resumed = run(None, lrs, 4, params=fresh, opt=opt2, start=4)
    for x, y in zip(unbroken[-1], resumed[-1]):
        torch.testing.assert_close(y, x, rtol=5e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CASES))
def test_snapshot_restore_undoes_steps(name):
    """What the CUDA-graph capture relies on: warm-up steps, then restore(), and the run goes on as if they had
    not happened, in the same tensors."""
    _, ours, lrs = CASES[name]
    _, _, unbroken = run(ours, lrs, 6)
    params, opt, _ = run(ours, lrs, 3)
    snap = opt.snapshot()
    saved = [p.detach().clone() for p in params]
    buffers = [id(b) for stacks in opt._stacks for s in stacks for b in s.buffers.values()]
    run(None, lrs, 2, params=params, opt=opt, start=3)  # warm-up steps to undo
    opt.restore(snap)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    assert buffers == [id(b) for stacks in opt._stacks for s in stacks for b in s.buffers.values()]
    _, _, resumed = run(None, lrs, 3, params=params, opt=opt, start=3)
    for x, y in zip(unbroken[-1], resumed[-1]):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_prepared_outside_steps_only_on_the_device():
    """With prepared_outside the step reads the numbers of the last prepare_step: stepping twice without one
    repeats the same warm-up factor (what a replayed graph does) instead of advancing the count."""
    params = make_params()
    opt = AdamWScheduleFree(groups_of(params, (1e-2, 1e-2)), warmup_steps=5)
    opt.train()
    opt.prepared_outside = True
    opt.prepare_step()
    k = opt.param_groups[0]["k"]
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    opt.step()
    opt.step()
    assert opt.param_groups[0]["k"] == k == 1


def test_prodigy_refuses_unequal_learning_rates():
    params = make_params()
    opt = Prodigy(groups_of(params, (1.0, 0.5)))
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    with pytest.raises(RuntimeError, match="learning rates must be equal"):
        opt.step()


def test_schedulefree_refuses_to_step_in_eval_mode():
    params = make_params()
    opt = AdamWScheduleFree(groups_of(params, (1e-2, 1e-2)))
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()
