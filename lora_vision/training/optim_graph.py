"""Prodigy, schedule-free AdamW and Adafactor in a form a CUDA graph can capture: the same updates as prodigyopt's
Prodigy (1.1.2), schedulefree's AdamWScheduleFree (1.4.1) and torch.optim.Adafactor, with the same state_dict
layout, so a checkpoint written by one loads into the other (tests/test_optim_graph.py compares them step
by step and across a resume).

The packages' steps read numbers on the host: Prodigy calls `.item()` twice per parameter, Adafactor once or twice,
and schedule-free computes its interpolation weights in Python from the step count. A captured step would freeze
those numbers at their first value. Here every step is split in two:

- `prepare_step()`, on the host, before the step: advance the step counters and write the numbers that depend only
  on the step count and the learning rate (warm-up factor, bias correction, averaging weight) into small device
  tensors (a fill each, no sync);
- `device_step()`, on the device only: everything that depends on the gradients, Prodigy's step-size estimate d
  included, which stays a device tensor.

`step()` runs both; a caller that replays a captured graph sets `prepared_outside` and calls `prepare_step()`
before each replay (training/sd/step.py, StaticStep). Parameters of one shape, dtype and device are stacked, so a
step is a few dozen kernels whatever the number of LoRA layers. Every parameter takes part in every step (a
parameter without a gradient counts as a zero gradient), where the packages skip it.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch

Tensor = torch.Tensor


class _Stack:
    """The parameters of one shape, dtype and device, and their state as stacked buffers (n, *shape); each
    parameter's state entries are views into them, so torch's state_dict sees per-parameter tensors."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.shape = tuple(params[0].shape)
        self.buffers: dict[str, Tensor] = {}

    def buffer(self, state: dict, key: str, shape: tuple[int, ...] | None = None,
               init: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """A stacked state buffer `key` (per-parameter shape `shape`, default the parameter's), made once, with each
        parameter's `state[p][key]` a view of it; `init(p)` gives a parameter's starting value (zeros)."""
        if key not in self.buffers:
            p0 = self.params[0]
            shape = self.shape if shape is None else shape
            buf = torch.zeros((len(self.params), *shape), dtype=p0.dtype, device=p0.device)
            for i, p in enumerate(self.params):
                if init is not None:
                    buf[i].copy_(init(p))
                state[p][key] = buf[i]
            self.buffers[key] = buf
        return self.buffers[key]

    def grads(self) -> Tensor:
        return torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def values(self) -> Tensor:
        return torch.stack([p.detach() for p in self.params])

    def write(self, new: Tensor) -> None:
        torch._foreach_copy_([p.detach() for p in self.params], list(new.unbind(0)))

    def relink(self, state: dict) -> None:
        """After torch's load_state_dict replaced the state tensors: copy them into the buffers, views again."""
        for key, buf in self.buffers.items():
            for i, p in enumerate(self.params):
                loaded = state[p].get(key)
                if loaded is not None and loaded is not buf[i]:
                    loaded = loaded.to(buf.device, buf.dtype)
                    buf[i].copy_(loaded.reshape(buf[i].shape) if loaded.numel() == buf[i].numel()
                                 else loaded.expand(buf[i].shape))  # Prodigy's p0 of a zero parameter: 0-d
                state[p][key] = buf[i]


class GraphOptimizer(torch.optim.Optimizer):
    """Base of the capturable optimizers: host bookkeeping in prepare_step, device math in device_step."""

    prepared_outside = False
    """Set by a caller that calls prepare_step() itself before each step (a captured graph's replay)."""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        super().__init__(params, defaults)
        self._stacks: list[list[_Stack]] = []  # per group
        self._scalars: dict[tuple[int, str], Tensor] = {}
        for group in self.param_groups:
            by_kind: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                by_kind.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
            self._stacks.append([_Stack(ps) for ps in by_kind.values()])
        self._init_state()

    def _init_state(self) -> None:
        raise NotImplementedError

    def _scalar(self, group: int, key: str, value: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """Device tensor `key` of group `group`, set to `value` (a fill: no host sync)."""
        t = self._scalars.get((group, key))
        if t is None:
            device = self.param_groups[group]["params"][0].device
            t = self._scalars[(group, key)] = torch.zeros((), dtype=dtype, device=device)
        t.fill_(value)
        return t

    def _get(self, group: int, key: str) -> Tensor:
        return self._scalars[(group, key)]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.prepared_outside:
            self.prepare_step()
        self.device_step()
        return loss

    def prepare_step(self) -> None:
        raise NotImplementedError

    def device_step(self) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for stacks in self._stacks:
            for stack in stacks:
                stack.relink(self.state)
        self._after_load()

    def _after_load(self) -> None:
        pass

    def snapshot(self) -> dict:
        """Everything a step changes (host counters, device scalars, state buffers), for restore()."""
        return {"groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.param_groups],
                "scalars": {k: v.clone() for k, v in self._scalars.items()},
                "buffers": [[{k: b.clone() for k, b in s.buffers.items()} for s in stacks] for stacks in self._stacks]}

    @torch.no_grad()
    def restore(self, snap: dict) -> None:
        """Put back a snapshot() in place (the same tensors, so a captured graph still reads them)."""
        for group, saved in zip(self.param_groups, snap["groups"]):
            group.update(copy.deepcopy(saved))
        for k, v in snap["scalars"].items():
            self._scalars[k].copy_(v)
        for stacks, saved in zip(self._stacks, snap["buffers"]):
            for stack, bufs in zip(stacks, saved):
                for k, b in bufs.items():
                    stack.buffers[k].copy_(b)


class Prodigy(GraphOptimizer):
    """prodigyopt's Prodigy (Mishchenko & Defazio 2023, arXiv:2306.06101) with its defaults: decoupled weight
    decay, no bias correction, no safeguard warm-up, d0 1e-6, unbounded growth, every element in the estimate
    (slice_p 1). d, its maximum and the running numerator are float64 device tensors (the package keeps Python
    floats); the groups' learning rates must all be equal or 0, as in the package."""

    def __init__(self, params: Iterable, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
                 use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
                 d_coef: float = 1.0, growth_rate: float = float("inf")) -> None:
        if not d0 > 0 or not lr > 0 or not eps > 0:
            raise ValueError(f"Prodigy needs d0, lr and eps > 0 (got {d0}, {lr}, {eps})")
        defaults = dict(lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, d=d0, d0=d0,
                        d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
                        use_bias_correction=use_bias_correction, decouple=decouple,
                        safeguard_warmup=safeguard_warmup, fsdp_in_use=False, slice_p=1)
        super().__init__(params, defaults)

    def _init_state(self) -> None:
        for gi, stacks in enumerate(self._stacks):
            for stack in stacks:
                flat = (math.prod(stack.shape),)  # the package keeps s and p0 flattened
                stack.buffer(self.state, "s", flat)
                stack.buffer(self.state, "p0", flat, init=lambda p: p.detach().flatten())
                if self.param_groups[gi]["betas"][0] > 0:
                    stack.buffer(self.state, "exp_avg")
                stack.buffer(self.state, "exp_avg_sq")
        self._after_load()

    def _after_load(self) -> None:
        """d, d_max and the numerator from the groups' floats into the device scalars (at the start and after
        load_state_dict)."""
        for key in ("d", "d_max", "d_numerator"):
            self._scalar(0, key, float(self.param_groups[0][key]), torch.float64)

    def state_dict(self) -> dict:
        """The package's layout: d, d_max, d_numerator as floats in every group, an int step per parameter."""
        for key in ("d", "d_max", "d_numerator"):
            value = float(self._get(0, key))
            for group in self.param_groups:
                group[key] = value
        k = self.param_groups[0]["k"]
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] = k
        return super().state_dict()

    def prepare_step(self) -> None:
        group = self.param_groups[0]
        lr = max(g["lr"] for g in self.param_groups)
        if any(g["lr"] not in (lr, 0.0) for g in self.param_groups):
            raise RuntimeError("Prodigy: the parameter groups' learning rates must be equal or 0 (it estimates one "
                               "step size for all); leave out --loraplus_lr_ratio and the per-part learning rates")
        beta1, beta2 = group["betas"]
        k = group["k"]
        bias = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) if group["use_bias_correction"] else 1.0
        self._scalar(0, "lr_bias", lr * bias, torch.float64)
        for g in self.param_groups:
            g["k"] = k + 1

    def device_step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        beta3 = group["beta3"] if group["beta3"] is not None else math.sqrt(beta2)
        d, d_max, d_num = self._get(0, "d"), self._get(0, "d_max"), self._get(0, "d_numerator")
        d0, d_coef, growth = group["d0"], group["d_coef"], group["growth_rate"]
        dlr = d * self._get(0, "lr_bias")
        numerator = d_num * beta3
        delta = torch.zeros((), dtype=torch.float64, device=d.device)
        denom = torch.zeros((), dtype=torch.float64, device=d.device)
        active = [(gi, g) for gi, g in enumerate(self.param_groups) if g["lr"] > 0]
        grads: dict[tuple[int, int], Tensor] = {}
        for gi, g in active:
            decay = g["weight_decay"]
            for si, stack in enumerate(self._stacks[gi]):
                grad = stack.grads()
                p = stack.values()
                if decay != 0 and not g["decouple"]:
                    grad = grad + decay * p
                grads[(gi, si)] = grad
                dtype, n = grad.dtype, len(stack.params)
                delta = delta + (d / d0) * dlr * (grad.reshape(n, -1) * (stack.buffers["p0"] - p.reshape(n, -1))
                                                  ).sum(dtype=torch.float64)
                if beta1 > 0:
                    ea = stack.buffers["exp_avg"]
                    ea.mul_(beta1).addcmul_(grad, (d * (1 - beta1)).to(dtype))
                stack.buffers["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad * (d * d * (1 - beta2)).to(dtype))
                s = stack.buffers["s"]
                alpha = (d / d0) * d if g["safeguard_warmup"] else (d / d0) * dlr
                s.mul_(beta3).add_(grad.reshape(n, -1) * alpha.to(dtype))
                denom = denom + s.abs().sum(dtype=torch.float64)
        if not active:
            return
        moved = denom > 0  # the package returns before the update when the denominator is 0
        safe = torch.where(moved, denom, torch.ones_like(denom))
        total = numerator + delta
        d_hat = d_coef * total / safe
        grown = torch.where(d == d0, torch.maximum(d, d_hat), d)
        new_max = torch.maximum(d_max, d_hat)
        new_d = torch.minimum(new_max, grown * growth) if math.isfinite(growth) else new_max
        d_num.copy_(torch.where(moved, total, d_num))
        d_max.copy_(torch.where(moved, new_max, d_max))
        d.copy_(torch.where(moved, new_d, d))
        step_on = moved.to(torch.float64)
        for gi, g in active:
            decay, eps = g["weight_decay"], g["eps"]
            for si, stack in enumerate(self._stacks[gi]):
                p = stack.values()
                dtype = p.dtype
                dlr_t = (dlr * step_on).to(dtype)
                den = stack.buffers["exp_avg_sq"].sqrt().add_((d * eps).to(dtype))
                if decay != 0 and g["decouple"]:
                    p = p - (decay * dlr_t) * p
                if beta1 > 0:
                    p = p - dlr_t * stack.buffers["exp_avg"] / den
                else:
                    p = p - (dlr_t * d.to(dtype)) * grads[(gi, si)] / den
                stack.write(p)


class AdamWScheduleFree(GraphOptimizer):
    """schedulefree's AdamWScheduleFree (Defazio et al. 2024, arXiv:2405.15682): the parameters hold the training
    point y in train mode and the average x in eval mode; z is the base sequence. Starts in eval mode, as the
    package does: call train() before stepping."""

    def __init__(self, params: Iterable, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay, foreach=True)
        super().__init__(params, defaults)

    def _init_state(self) -> None:
        for stacks in self._stacks:
            for stack in stacks:
                stack.buffer(self.state, "z", init=lambda p: p.detach())
                stack.buffer(self.state, "exp_avg_sq")

    @torch.no_grad()
    def _swap(self, train: bool) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["train_mode"] == train:
                continue
            beta1 = group["betas"][0]
            for stack in self._stacks[gi]:
                stack.write(stack.values().lerp(stack.buffers["z"], (1 - beta1) if train else (1 - 1 / beta1)))
            group["train_mode"] = train

    def eval(self) -> None:
        """Parameters to the average x (for evaluation and saving)."""
        self._swap(False)

    def train(self) -> None:
        """Parameters to the training point y."""
        self._swap(True)

    def prepare_step(self) -> None:
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError("AdamWScheduleFree: the optimizer is in eval mode; call optimizer.train() before "
                               "stepping (training/optim.py, eval_mode, swaps back after evaluation)")
        for gi, group in enumerate(self.param_groups):
            k, beta2 = group["k"], group["betas"][1]
            sched = (k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0
            lr = group["lr"] * sched
            group["scheduled_lr"] = lr
            lr_max = group["lr_max"] = max(lr, group["lr_max"])
            weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
            weight_sum = group["weight_sum"] = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum else 0.0
            self._scalar(gi, "bias2", 1 - beta2 ** (k + 1))
            self._scalar(gi, "ckp1", ckp1)
            self._scalar(gi, "lr", lr)
            self._scalar(gi, "y_step", lr * (group["betas"][0] * (1 - ckp1) - 1))
            group["k"] = k + 1

    def device_step(self) -> None:
        for gi, group in enumerate(self.param_groups):
            beta2, decay, eps = group["betas"][1], group["weight_decay"], group["eps"]
            bias2, ckp1 = self._get(gi, "bias2"), self._get(gi, "ckp1")
            lr, y_step = self._get(gi, "lr"), self._get(gi, "y_step")
            for stack in self._stacks[gi]:
                grad, y = stack.grads(), stack.values()
                z, v = stack.buffers["z"], stack.buffers["exp_avg_sq"]
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                normed = grad / (v / bias2).sqrt_().add_(eps)
                if decay != 0:
                    normed = normed + decay * y
                y = y.lerp(z, ckp1) + y_step * normed
                z.sub_(lr * normed)
                stack.write(y)


class Adafactor(GraphOptimizer):
    """torch.optim.Adafactor (Shazeer & Stern 2018, as torch implements it: relative step size min(lr, 1/sqrt(t)),
    second moments factored over the last two dimensions, the update's RMS clipped at d, weight decay scaled by
    lr)."""

    def __init__(self, params: Iterable, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0, weight_decay: float = 0.0) -> None:
        if not beta2_decay <= 0 or not d >= 1 or not lr >= 0 or not weight_decay >= 0:
            raise ValueError(f"Adafactor: expected beta2_decay <= 0, d >= 1, lr >= 0, weight_decay >= 0 (got "
                             f"{beta2_decay}, {d}, {lr}, {weight_decay})")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=False,
                        maximize=False)
        super().__init__(params, defaults)
        self._t = 0

    def _init_state(self) -> None:
        for stacks in self._stacks:
            for stack in stacks:
                shape = stack.shape
                if len(shape) > 1:
                    stack.buffer(self.state, "row_var", (*shape[:-1], 1))
                    stack.buffer(self.state, "col_var", (*shape[:-2], 1, shape[-1]))
                else:
                    stack.buffer(self.state, "variance")

    def state_dict(self) -> dict:
        """torch's layout: a CPU float step per parameter."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(float(self._t))
        return super().state_dict()

    def _after_load(self) -> None:
        steps = [self.state[p].get("step") for g in self.param_groups for p in g["params"]]
        self._t = int(float(steps[0])) if steps and steps[0] is not None else 0

    def snapshot(self) -> dict:
        return dict(super().snapshot(), t=self._t)

    def restore(self, snap: dict) -> None:
        super().restore(snap)
        self._t = snap["t"]

    def prepare_step(self) -> None:
        self._t += 1
        t = float(self._t)
        for gi, group in enumerate(self.param_groups):
            self._scalar(gi, "beta2_t", t ** group["beta2_decay"])
            self._scalar(gi, "rho", min(group["lr"], 1 / t ** 0.5))
            self._scalar(gi, "decay", 1 - group["lr"] * group["weight_decay"])

    def device_step(self) -> None:
        for gi, group in enumerate(self.param_groups):
            eps1, eps2 = group["eps"]
            beta2_t, rho, keep = self._get(gi, "beta2_t"), self._get(gi, "rho"), self._get(gi, "decay")
            for stack in self._stacks[gi]:
                grad, p = stack.grads(), stack.values()
                n = len(stack.params)
                e1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
                numel = p[0].numel()
                alpha = torch.clamp_min(p.reshape(n, -1).norm(dim=1) / numel ** 0.5, eps2) * rho
                if group["weight_decay"] != 0:
                    p = p * keep
                if len(stack.shape) > 1:
                    row_var, col_var = stack.buffers["row_var"], stack.buffers["col_var"]
                    row_var.lerp_(grad.norm(dim=-1, keepdim=True).square_().div_(grad.size(-1)), beta2_t)
                    col_var.lerp_(grad.norm(dim=-2, keepdim=True).square_().div_(grad.size(-2)), beta2_t)
                    estimate = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=e1))
                else:
                    variance = stack.buffers["variance"]
                    variance.lerp_(grad * grad, beta2_t)
                    estimate = variance.clone()
                update = estimate.clamp_(min=e1 * e1).rsqrt_().mul_(grad)
                denom = torch.clamp_min(update.reshape(n, -1).norm(dim=1) / (numel ** 0.5 * group["d"]), 1.0)
                scale = (-alpha / denom).reshape(n, *([1] * len(stack.shape)))
                stack.write(p + update * scale)


GRAPH_OPTIMIZERS: dict[str, type[GraphOptimizer]] = {"prodigy": Prodigy, "schedulefree": AdamWScheduleFree,
                                                     "adafactor": Adafactor}

