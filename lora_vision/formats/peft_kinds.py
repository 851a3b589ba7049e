"""The adapter kinds peft has besides plain LoRA, in peft folders: LoHa (`LoHaConfig`), LoKr (`LoKrConfig`) and
DoRA (`LoraConfig(use_dora=True)`), as peft 0.21 saves and loads them. `formats.peft` reads and writes the folders;
this module maps one component's layers to peft's tensors and config fields and back.

| kind | peft_type | tensors (`base_model.model.<module>.…`) | scale |
|---|---|---|---|
| LoHa | LOHA | `hada_w1_a` (out, r), `hada_w1_b` (r, in·kh·kw), `hada_w2_a`, `hada_w2_b`; conv k×k with `use_effective_conv2d`: `hada_t1`/`hada_t2` (r, r, kh, kw), `_a` (r, out), `_b` (r, in) | alpha / r |
| LoKr | LOKR | `lokr_w1` (a, c) or `lokr_w1_a` (a, r) + `lokr_w1_b` (r, c); `lokr_w2` (b, d[, kh, kw]) or `lokr_w2_a` (b, r) + `lokr_w2_b` (r, d·kh·kw), Tucker: `lokr_t2` (r, r, kh, kw), `lokr_w2_a` (r, b), `lokr_w2_b` (r, d) | alpha / r, also when nothing is decomposed |
| DoRA | LORA, use_dora | `lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`: (out,) for Linear, (1, out, 1, 1) for Conv2d | alpha / r (or / sqrt(r)) |

The factor names are LyCORIS' (lora.kinds), so only the scale and a few layouts differ: LoKr with neither factor
decomposed scales by alpha / r in peft but by 1 in LyCORIS files (the import folds peft's scale into `lokr_w1`; the
export writes alpha = r); the DoRA magnitude is per output row, and a Conv2d's is stored as (1, out, 1, 1), which
would read as per input column (ComfyUI's orientation) if kept, so it is reshaped to (out, 1, 1, 1) on import.

peft builds each layer's factors from its config before loading the tensors (lokr/layer.py `update_layer`): the
sides of the weight split as (f, dim / f) when `decompose_factor` f divides dim, else as square as possible;
w2 is decomposed when r < max(b, d) / 2, w1 when `decompose_both` and r < max(a, c) / 2; Tucker cores only on k×k
convolutions with `use_effective_conv2d`. The export chooses r per module, `decompose_both` and `decompose_factor`
so that peft rebuilds exactly our factors, and refuses, naming the layer and its shapes, what no config gives.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping

import torch

from ..lora.kinds import DORA, dora_on_out, factorization, get_kind, rank_of
from ..lora.ops import layer_tensors
from ..lora.spec import LayerSpec

PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"
PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}
"""peft_type -> our kind (LORA with use_dora is our LoRA with a `dora_scale`)."""
_FACTOR = {"lora_A.weight": "A", "lora_B.weight": "B", MAGNITUDE: DORA, f"{MAGNITUDE}.weight": DORA,
           **{n: n for k in ("loha", "lokr") for n in get_kind(k).factor_names if n != DORA}}


class PeftExportError(ValueError):
    """An adapter's layers have no peft folder that reproduces them (a kind peft lacks, a mixture, a layout)."""


def split_key(key: str) -> tuple[str, str] | None:
    """(module, factor) of a peft adapter tensor key (`base_model.model.<module>.hada_w1_a`, `...lora_A.weight`,
    `...lora_magnitude_vector`; an adapter name `.default` is dropped), None for other keys (modules_to_save)."""
    k = key.removeprefix(PREFIX).replace(".default.", ".").removesuffix(".default")
    for suffix, factor in _FACTOR.items():
        if k.endswith("." + suffix):
            return k[: -len(suffix) - 1], factor
    return None


def kind_label(peft_type: str, use_dora: bool) -> str:
    """What an adapter_config.json declares, in the words of the load report: `LoHa`, `LoRA+DoRA`."""
    return get_kind(PEFT_TYPES[peft_type]).label + ("+DoRA" if use_dora else "")


# ---- import ---------------------------------------------------------------------------------------------------

def magnitude_problem(magnitude: torch.Tensor, out_rows: int) -> str | None:
    """Why a peft DoRA magnitude does not fit a layer with `out_rows` output rows (None when it does)."""
    if magnitude.numel() != out_rows:
        return (f"lora_magnitude_vector has shape {tuple(magnitude.shape)} ({magnitude.numel()} values) but lora_B "
                f"has {out_rows} output rows; peft's DoRA magnitude holds one value per output row")
    return None


def our_magnitude(magnitude: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """peft's magnitude ((out,) or (1, out, 1, 1)) as our per-output-row `dora_scale` (out, 1[, 1, 1])."""
    return magnitude.reshape(-1, *[1] * (a.dim() - 1))


def lycoris_scale(config: Mapping, module: str, pattern_value) -> float:
    """peft's scale alpha / r of a LoHa / LoKr module (rank_pattern and alpha_pattern applied); 1 without a config."""
    if not config:
        return 1.0
    r = pattern_value(config.get("rank_pattern") or {}, module)
    a = pattern_value(config.get("alpha_pattern") or {}, module)
    r = float(r if r is not None else config.get("r", 8))
    a = float(a if a is not None else config.get("alpha", 8))
    return a / r


def scaled_spec(kind: str, factors: dict[str, torch.Tensor], scale: float) -> LayerSpec:
    """Our layer for peft factors scaled by `scale`: alpha = scale * rank, or, for a LoKr without a rank (our scale
    is 1 there, whatever alpha says), the scale folded into lokr_w1."""
    rank = rank_of(kind, factors)
    if rank > 0:
        return LayerSpec(None, None, scale * rank, "lora", kind, factors)
    if scale != 1.0:
        w1 = factors["lokr_w1"]
        factors = {**factors, "lokr_w1": (w1.float() * scale).to(w1.dtype)}
    return LayerSpec(None, None, 1.0, "lora", kind, factors)


# ---- export ---------------------------------------------------------------------------------------------------

_KINDS_HELD = "peft folders hold LoRA, LoRA+DoRA, LoHa and LoKr layers (peft's LoHa and LoKr have no DoRA magnitude)"
_KEEP = "keep it in our own format (--to lora_vision; SD adapters also --to kohya), which holds every kind"


def peft_type(layers: Mapping[str, LayerSpec], comp: str) -> tuple[str, bool]:
    """(peft_type, use_dora) of one component's layers; PeftExportError for kinds peft lacks and for mixtures
    (one peft folder has one peft_type and one use_dora)."""
    seen: dict[tuple[str, bool], str] = {}
    for key, spec in layers.items():
        dora = DORA in spec.factors
        if spec.kind == "lora" and "diff_b" in spec.factors:
            raise PeftExportError(f"{comp}.{key}: a LoRA layer with a bias update (diff_b, e.g. a Flux.1 control "
                                  f"LoRA) is not written as a peft folder; {_KEEP}")
        if spec.kind == "lora":
            t = ("LORA", dora)
        elif spec.kind in ("loha", "lokr") and not dora:
            t = (spec.kind.upper(), False)
        else:
            raise PeftExportError(f"{comp}.{key}: {spec.label} layers have no peft form; {_KINDS_HELD}. {_KEEP}, "
                                  "or turn every layer into plain LoRA (lora-vision convert FILE --rank N [--base "
                                  "MODEL] --to peft)")
        seen.setdefault(t, key)
    if len(seen) > 1:
        what = " and ".join(f"{kind_label(*t)} ({comp}.{k})" for t, k in seen.items())
        raise PeftExportError(f"{comp} mixes {what}; a peft folder holds one kind (one peft_type and use_dora) per "
                              f"component: {_KEEP}")
    return next(iter(seen), ("LORA", False))


def lora_view(layers: Mapping[str, LayerSpec], comp: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LoRA / LoRA+DoRA layers as (canonical plain LoRA state dict, peft magnitude per module): a Tucker core is
    folded into A (exact), a DoRA magnitude must be per output row (peft has no other orientation)."""
    state: dict[str, torch.Tensor] = {}
    magnitudes: dict[str, torch.Tensor] = {}
    for key, spec in layers.items():
        dora = spec.factors.get(DORA)
        plain = replace(spec, factors={n: t for n, t in spec.factors.items() if n != DORA}).as_plain()
        state.update(layer_tensors(key, plain))
        if dora is None:
            continue
        out = plain.B.shape[0]
        if not dora_on_out(dora, out):
            raise PeftExportError(f"{comp}.{key}: dora_scale {tuple(dora.shape)} is one value per input column "
                                  f"(ComfyUI's orientation); peft's DoRA magnitude is per output row ({out} values), "
                                  f"so this layer has no peft form: {_KEEP}")
        magnitudes[key] = dora.reshape(-1) if plain.A.dim() == 2 else dora.reshape(1, -1, 1, 1)
    return state, magnitudes


def loha_state(layers: Mapping[str, LayerSpec], comp: str) -> tuple[dict, dict[str, tuple[int, float]], dict]:
    """peft LoHa tensors (prefixed), (r, alpha) per module and the LOHA config fields."""
    tensors, targets, tucker = {}, {}, set()
    for key, spec in layers.items():
        f = spec.factors
        r, r2 = f["hada_w1_b"].shape[0], f["hada_w2_b"].shape[0]
        if r != r2:
            raise PeftExportError(f"{comp}.{key}: LoHa halves of ranks {r} and {r2}; peft's LoHa has one rank per "
                                  "layer")
        t1 = f.get("hada_t1")
        if t1 is not None:
            if tuple(t1.shape[2:]) in ((), (1,), (1, 1)):
                raise PeftExportError(f"{comp}.{key}: hada_t1 {tuple(t1.shape)} is a Tucker core on a 1x1 kernel; "
                                      "peft uses Tucker cores (use_effective_conv2d) only on k x k convolutions")
            tucker.add(key)
            out = dict(f)
        else:
            out = {n: t.flatten(1) for n, t in f.items()}
        tensors.update({f"{PREFIX}{key}.{n}": t for n, t in out.items()})
        targets[key] = (r, spec.scaling * r)
    return tensors, targets, {"peft_type": "LOHA", "use_effective_conv2d": bool(tucker)}


def lokr_split(dim: int, factor: int) -> tuple[int, int]:
    """How peft's LoKr splits a side of `dim`: (factor, dim / factor) when factor divides dim (in that order, unlike
    lora.kinds.factorization), else the same split as ours."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    return factorization(dim, factor)


def _lokr_layout(comp: str, key: str, f: Mapping[str, torch.Tensor], weight_shape: tuple[int, ...] | None) -> dict:
    """Sizes of a LoKr layer: w1 (a, c), w2 (b, d) with d None when the kernel cannot be told from the factors,
    the ranks of the decomposed factors, and whether w2 has a Tucker core."""
    if "lokr_w1" in f:
        (a, c), r1 = f["lokr_w1"].shape, None
    else:
        a, r1, c = f["lokr_w1_a"].shape[0], f["lokr_w1_a"].shape[1], f["lokr_w1_b"].shape[1]
    t2 = f.get("lokr_t2")
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
        b, d, r2 = w2.shape[0], w2.shape[1], None
    elif t2 is not None:
        if tuple(t2.shape[2:]) in ((), (1,), (1, 1)):
            raise PeftExportError(f"{comp}.{key}: lokr_t2 {tuple(t2.shape)} is a Tucker core on a 1x1 kernel; peft "
                                  "uses Tucker cores (use_effective_conv2d) only on k x k convolutions")
        b, d, r2 = f["lokr_w2_a"].shape[1], f["lokr_w2_b"].shape[1], t2.shape[0]
    else:  # w2_b (r, d * kh * kw): d comes from the layer's weight when known (the kernel is not in the factors)
        b, r2 = f["lokr_w2_a"].shape
        d = weight_shape[1] // c if weight_shape else None
    return {"a": int(a), "c": int(c), "b": int(b), "d": None if d is None else int(d), "r1": r1, "r2": r2,
            "tucker": t2 is not None}


def lokr_state(layers: Mapping[str, LayerSpec], comp: str, weights: Mapping[str, tuple[int, ...]] | None = None
               ) -> tuple[dict, dict[str, tuple[int, float]], dict]:
    """peft LoKr tensors (prefixed), (r, alpha) per module and the LOKR config fields (decompose_both,
    decompose_factor, use_effective_conv2d) under which peft rebuilds exactly these factors. `weights` (module ->
    weight shape, from the model when given) lets the sizes of a decomposed w2 be checked too."""
    shapes = {key: _lokr_layout(comp, key, spec.factors, (weights or {}).get(key)) for key, spec in layers.items()}
    both = any(s["r1"] is not None for s in shapes.values())

    def where(key: str, s: dict) -> str:
        fs = layers[key].factors
        return f"{comp}.{key} ({', '.join(f'{n} {tuple(t.shape)}' for n, t in fs.items())})"

    ranks = {}
    for key, s in shapes.items():
        r1, r2 = s["r1"], s["r2"]
        big1 = max(s["a"], s["c"])
        big2 = max(s["b"], s["d"]) if s["d"] is not None else None
        if r1 is not None and r2 is not None and r1 != r2:
            raise PeftExportError(f"{where(key, s)}: w1 and w2 decomposed at ranks {r1} and {r2}; peft's LoKr has "
                                  "one rank per layer")
        r = r2 if r2 is not None else r1
        if r2 is not None and big2 is not None and not r2 < big2 / 2:
            raise PeftExportError(f"{where(key, s)}: w2 decomposed at rank {r2}, but peft keeps w2 whole unless the "
                                  f"rank is below max(b, d) / 2 = {big2 / 2}")
        if r1 is not None and not r1 < big1 / 2:
            raise PeftExportError(f"{where(key, s)}: w1 decomposed at rank {r1}, but peft keeps w1 whole unless the "
                                  f"rank is below max(a, c) / 2 = {big1 / 2}")
        if r2 is None:  # w2 whole: peft needs r >= max(b, d) / 2
            need = max(1, math.ceil(big2 / 2), math.ceil(big1 / 2) if both and r1 is None else 0)
            if r is None:
                r = need
            elif r < big2 / 2:
                raise PeftExportError(f"{where(key, s)}: w2 whole with w1 decomposed at rank {r}; peft keeps w2 "
                                      f"whole only for ranks >= max(b, d) / 2 = {big2 / 2}")
        if both and r1 is None and r < big1 / 2:
            raise PeftExportError(f"{where(key, s)}: w1 whole at rank {r} while other layers decompose w1; peft "
                                  f"(decompose_both) would split it, as r < max(a, c) / 2 = {big1 / 2}")
        ranks[key] = r
    def fits(s: dict, f: int) -> bool:
        return lokr_split(s["a"] * s["b"], f) == (s["a"], s["b"]) and (
            s["d"] is None or lokr_split(s["c"] * s["d"], f) == (s["c"], s["d"]))

    sizes = sorted({v for s in shapes.values() for v in (s["a"], s["b"], s["c"], s["d"]) if v is not None})
    factor = next((f for f in (-1, *sizes) if all(fits(s, f) for s in shapes.values())), None)
    if factor is None:
        key, s = next((k, s) for k, s in shapes.items() if not fits(s, -1))
        raise PeftExportError(f"the LoKr layers of {comp} split their sides in ways no single peft decompose_factor "
                              f"reproduces (first that the square split does not give: {where(key, s)}); {_KEEP}")
    tensors, targets = {}, {}
    for key, spec in layers.items():
        r = ranks[key]
        for n, t in spec.factors.items():
            flat = n == "lokr_w2_b" and not shapes[key]["tucker"]
            tensors[f"{PREFIX}{key}.{n}"] = t.flatten(1) if flat else t
        targets[key] = (r, spec.scaling * r)  # no rank (nothing decomposed): our scale is 1, so alpha = r
    fields = {"peft_type": "LOKR", "use_effective_conv2d": any(s["tucker"] for s in shapes.values()),
              "decompose_both": both, "decompose_factor": factor, "rank_dropout_scale": False}
    return tensors, targets, fields
