"""A denoiser (UNet or transformer) replayed from CUDA graphs at inference: the host launches one graph per step
instead of a thousand kernels, so an eager step bound by launch overhead runs at the GPU's speed.

    server = AdapterServer(pipe); server.add("ink", "ink.safetensors"); server.prepare()
    pipe.unet = CapturedModel(pipe.unet)      # after prepare(): the slots are part of what is captured
    image = pipe("a photo", ...).images[0]    # the first call of each input shape captures (a few steps of work)
    server.activate("clay", strength=0.7)     # copies into the slots in place: the graphs stay valid

One graph per input signature (shapes, dtypes, devices and the non-tensor arguments), recorded under torch.no_grad
after `warmup` eager calls on a side stream; the graphs share one memory pool. A call replays the graph: its
tensors are copied into the graph's static inputs and the outputs are copied out (a later call never overwrites
what an earlier one returned).

What a graph holds is what ran when it was recorded. Changing tensors in place keeps it valid: AdapterServer's
activate / set_strength, `pipeline.set_adapter_strength` (one strength table per device). A change of the modules
that run (loading, unloading, switching or fusing adapters through lora_vision.pipeline, AdapterServer.prepare)
moves `lora.layers.layout_generation()`, and the next call records new graphs; so does moving or casting the
model (`.to()`); anything else that changes the model (new weights by assignment, hooks) needs `reset()`.

Runs eagerly, as the model itself: on the CPU, with gradients enabled, and for an input signature whose capture
failed (a warning says why, once).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .lora.layers import layout_generation


class CapturedModel(nn.Module):
    """`model` with its inference forward replayed from CUDA graphs, one per input signature (module docstring).
    Attributes the pipeline reads (config, dtype, device, ...) are the model's."""

    def __init__(self, model: nn.Module, warmup: int = 2) -> None:
        super().__init__()
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: at least one eager call must run before a capture")
        self.model = model
        self.warmup = warmup
        self._graphs: dict[Any, Any] = {}
        self._failed: dict[Any, str] = {}
        self._pool: Any = None
        self._layout = layout_generation()
        self.captures = 0
        """Graphs recorded so far (a new input signature, or a new layout after an adapter change)."""
        self.capture_s = 0.0
        """Seconds spent recording them (the warm-up calls included)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _apply(self, fn: Any, recurse: bool = True) -> "CapturedModel":
        # .to() / .half() / .cuda() give the weights new memory: graphs recorded before would read the old one
        self.reset()
        return super()._apply(fn, recurse)

    def reset(self) -> None:
        """Drop every graph: the next call of each signature records again."""
        self._graphs.clear()
        self._failed.clear()
        self._pool = None
        self._layout = layout_generation()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), None)
        if device is None or device.type != "cuda" or torch.is_grad_enabled() or \
                torch.cuda.is_current_stream_capturing():
            return self.model(*args, **kwargs)
        if self._layout != layout_generation():
            self.reset()
        if "timestep" in kwargs and isinstance(kwargs["timestep"], (int, float)):
            kwargs = dict(kwargs, timestep=torch.tensor(kwargs["timestep"], device=device))
            leaves, spec = pytree.tree_flatten((args, kwargs))
        elif len(args) > 1 and isinstance(args[1], (int, float)):  # (sample, timestep, ...): a number per step
            args = (args[0], torch.tensor(args[1], device=device), *args[2:])
            leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (repr(spec), tuple((tuple(x.shape), x.dtype, x.device, x.stride()) if isinstance(x, torch.Tensor)
                           else ("value", x) for x in leaves))
        try:
            hash(key)
        except TypeError:  # an argument that cannot tell one call from another (a dict of lists, ...)
            return self.model(*args, **kwargs)
        if key in self._failed:
            return self.model(*args, **kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._record(key, leaves, spec)
            if graph is None:
                return self.model(*args, **kwargs)
        g, static_in, static_out, out_spec = graph
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if tensors:
            torch._foreach_copy_(static_in, tensors)
        g.replay()
        return pytree.tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in static_out],
                                     out_spec)

    def _record(self, key: Any, leaves: list, spec: Any) -> Any:
        t0 = time.perf_counter()
        with torch.inference_mode(False):  # plain tensors: later calls may copy into them outside inference mode
            static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_in = [x for x in static_leaves if isinstance(x, torch.Tensor)]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.model(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = self.model(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - an op that cannot be captured: this signature runs eagerly
            torch.cuda.synchronize()
            reason = str(err).splitlines()[0][:300]
            self._failed[key] = reason
            warnings.warn(f"CapturedModel: CUDA graph capture of {type(self.model).__name__} failed ({reason}); "
                          "this input shape runs eagerly", stacklevel=3)
            return None
        self._pool = g.pool()
        static_out, out_spec = pytree.tree_flatten(out)
        if any(not isinstance(t, torch.Tensor) and _holds_tensors(t) for t in static_out):
            self._failed[key] = "an output pytree cannot take apart"
            warnings.warn(f"CapturedModel: {type(self.model).__name__} returns {type(out).__name__}, whose tensors "
                          "cannot be copied out of the graph; this input shape runs eagerly", stacklevel=3)
            return None
        self._graphs[key] = (g, static_in, static_out, out_spec)
        self.captures += 1
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        return self._graphs[key]


def _holds_tensors(obj: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in getattr(obj, "__dict__", {}).values())
