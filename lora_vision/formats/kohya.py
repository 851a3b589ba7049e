"""The kohya format (`lora_unet_...`, `lora_te[12]_...`) that A1111, ComfyUI and kohya sd-scripts load.

Import accepts both UNet naming styles (diffusers and LDM/SGM), `lycoris_` (SimpleTuner) and ComfyUI's generic
`diffusion_model.<ldm>` / `text_encoders.<clip>.transformer.<hf>` names.

Export writes the one spelling all three loaders read (tests/formats/test_kohya_format.py pins the golden keys):

- SD 1.x / 2.x: `lora_unet_<diffusers name>`, `lora_te_text_model_encoder_layers_...`;
  SDXL: `lora_unet_<SGM name>`, `lora_te1_...`, `lora_te2_...` (transformers-4 CLIP names).
- `.lora_down.weight` (A; conv: 4D, kernel on down), `.lora_up.weight` (B; conv 1x1, 4D), 0-dim `.alpha`.
- One dtype for everything (fp16 by default; fp32, with a warning, when a value exceeds fp16's range), one alpha
  for the file (a second one for k x k convs): modules with another alpha get B rescaled by
  alpha_module / alpha_file, which keeps the update exact. No other tensors.
- Metadata: ss_*, modelspec.*, sshs_model_hash = sha256 of the exact data region written, lora_vision.*.
- Layers of other kinds (LoHa, LoKr, DoRA, Tucker LoCon, OFT, BOFT, (IA)^3, full diff) are written as LyCORIS
  writes them: `<kohya key>.<factor>` with the LyCORIS factor names (`hada_w1_a`, `lokr_w2`, `lora_mid.weight`,
  `dora_scale`, `oft_blocks`, `weight`/`on_input`, `diff`/`diff_b`) and each module's own alpha;
  ss_network_module `lycoris.kohya` with the algo in ss_network_args. Reading such a file back is exact.
- Bundled text embeddings (pivotal tuning), as A1111's Lora extension reads them (`bundle_emb` in its
  extensions-builtin/Lora/networks.py) and OneTrainer writes them: SD 1.x / 2.x `bundle_emb.<token>.string_to_param.*`,
  SDXL `bundle_emb.<token>.clip_l` and `bundle_emb.<token>.clip_g`, each (vectors, width). The separate A1111
  textual-inversion file (a1111_embedding_tensors) has `emb_params` (SD 1.x / 2.x) or `clip_l` / `clip_g` (SDXL).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..adapter import Adapter, check_token, embedding_tensors
from ..io import AdapterFileError, write_safetensors
from ..metadata import AdapterMetadata
from . import naming
from ..lora.kinds import LOKR_ROWS, check as check_kind, get_kind, kind_of, known_factor, rank_of
from ..lora.ops import layer_tensors
from ..lora.spec import LayerSpec, split_key
from .common import NORM_TYPES, ComponentInfo, ImportReport, alpha_value, fit_pair, guess_base, is_unsupported, put
from .diffusers import path_name, provenance
from .resolve import COMFY_CLIP, NameResolver, default_infos, guess_unet_layout, te_layer_count

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")
_DOWN = ("lora_down.weight", "lora_A.weight")
_UP = ("lora_up.weight", "lora_B.weight")
_COMFY_TE = re.compile(r"^text_encoders\.(clip_[lgh])\.transformer\.(.+)$")
_TENSOR_SUFFIX = re.compile(r"\.(lora_(?:down|up|A|B)\.weight|alpha|lora_mid\.weight|dora_scale|scale|bias|"
                            r"hada_\w+|lokr_\w+|diff(?:_b)?|w_norm|b_norm|reshape_weight|oft_\w+)$")


def is_kohya_key(key: str) -> bool:
    """True for keys in the kohya / LyCORIS / ComfyUI-generic naming."""
    return key.startswith(KOHYA_PREFIXES) or key.startswith(COMFY_PREFIXES)


def _split(key: str) -> tuple[str, str]:
    """(module key, tensor suffix). kohya module keys have no dots; ComfyUI generic ones do."""
    if key.startswith(COMFY_PREFIXES):
        m = _TENSOR_SUFFIX.search(key)
        return (key[: m.start()], m.group(1)) if m else (key, "")
    mod, _, suffix = key.partition(".")
    return mod, suffix


def _infos_for(groups: Mapping[str, dict], infos: Mapping[str, ComponentInfo] | None) -> dict[str, ComponentInfo]:
    if infos:
        return dict(infos)
    unet_keys = [k for k in groups if k.startswith(("lora_unet_", "lycoris_"))]
    comfy_unet = [k for k in groups if k.startswith("diffusion_model.")]
    layout = None
    if unet_keys or comfy_unet:
        layout = guess_unet_layout(unet_keys or comfy_unet, kohya_keys=bool(unet_keys))
    te1 = [k for k in groups if k.startswith(("lora_te_", "lora_te1_")) or re.match(r"text_encoders\.clip_[lh]", k)]
    te2 = [k for k in groups if k.startswith("lora_te2_") or k.startswith("text_encoders.clip_g")]
    return default_infos(layout, {"text_encoder": te_layer_count(te1), "text_encoder_2": te_layer_count(te2)})


def import_kohya(tensors: Mapping[str, torch.Tensor], infos: Mapping[str, ComponentInfo] | None = None,
                 source: str = "<tensors>") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """kohya/LyCORIS/ComfyUI tensors -> canonical adapter tensors (component-prefixed, live names) and a report.

    `infos` describes the target models (see `describe_models`); without it, standard layouts are assumed.
    """
    report = ImportReport("kohya")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not is_kohya_key(key):
            report.unused.append(key)
            continue
        mod, suffix = _split(key)
        groups.setdefault(mod, {})[suffix] = t
    resolver = NameResolver(_infos_for(groups, infos))
    out: dict[str, torch.Tensor] = {}
    for mod, g in groups.items():
        scale = g.pop("scale", None)  # A1111: `scale` overrides alpha / r
        factors = kind_factors(g)
        kind = kind_of(factors, factors)
        if kind is None and set(g) - {"alpha"}:
            report.unsupported += [f"{mod}.{s} (unknown adapter kind)" for s in sorted(g)]
            continue
        if kind is not None and (kind != "lora" or set(factors) - {"A", "B"}):
            _import_kind(out, report, resolver, source, mod, kind, g, factors, scale)
            continue
        bad = sorted(s for s in g if is_unsupported(s))
        if bad:  # tensors next to a plain LoRA pair that no loader of ours applies (A1111's `.bias`, ...)
            report.unsupported += [f"{mod}.{s}" for s in bad]
            continue
        down = next((g[s] for s in _DOWN if s in g), None)
        up = next((g[s] for s in _UP if s in g), None)
        known = {*_DOWN, *_UP, "alpha"}
        report.unused += [f"{mod}.{s}" for s in g if s not in known]
        if down is None or up is None:
            have = ", ".join(sorted(g))
            raise AdapterFileError(f"{source}: module {mod} has only [{have}]; a LoRA module needs lora_down and "
                                   "lora_up (an orphan alpha or half a pair means the file is broken)")
        target = _target(mod, resolver)
        if target is None:
            report.not_found.append(mod)
            continue
        comp, live, info, kind, wshape = target
        if kind in NORM_TYPES:
            report.invalid.append(f"{mod}: a LoRA pair (lora_down / lora_up) on a {kind}, which takes w_norm / "
                                  "b_norm only")
            continue
        if not info.live:
            kind = "Conv2d" if down.dim() == 4 else "Linear"
        a, b = fit_pair(f"{source}: {mod}", kind, wshape or None, down, up, info.live)
        put(out, comp, live, a, b, _alpha(source, mod, g.get("alpha"), scale, a.shape[0]))
        report.matched.append(f"{comp}.{live}")
        report.kinds["LoRA"] = report.kinds.get("LoRA", 0) + 1
    return out, report


# File suffix -> factor name (lora.kinds); every other kind's suffixes are the factor names themselves.
_FACTOR = {"lora_down.weight": "A", "lora_A.weight": "A", "lora_up.weight": "B", "lora_B.weight": "B",
           "lora_mid.weight": "lora_mid"}


# Factor name -> file suffix, the inverse of _FACTOR for export (LyCORIS / kohya spelling).
_SUFFIX = {"A": "lora_down.weight", "B": "lora_up.weight", "lora_mid": "lora_mid.weight"}


def _import_kind(out: dict[str, torch.Tensor], report: ImportReport, resolver: NameResolver, source: str, mod: str,
                 kind: str, g: Mapping[str, torch.Tensor], factors: dict[str, torch.Tensor],
                 scale: torch.Tensor | None) -> None:
    """One module of another kind than plain LoRA: checked against the target's weight, stored in the native
    layout. Problems (half a kind's tensors, shapes that do not multiply to the weight, a DoRA scale of the wrong
    length) go to `report.invalid` with the layer and the shapes."""
    report.unused += [f"{mod}.{s}" for s in g if s != "alpha" and not known_factor(_FACTOR.get(s, s))]
    target = _target(mod, resolver)
    if target is None:
        report.not_found.append(mod)
        return
    comp, live, info, mtype, wshape = target
    spec = kind_spec(source, mod, kind, g, factors, scale, mtype, wshape, info.live)
    if isinstance(spec, list):
        report.invalid += spec
        return
    for k, t in layer_tensors(live, spec).items():
        out[f"{comp}.{k}"] = t
    report.matched.append(f"{comp}.{live}")
    report.kinds[spec.label] = report.kinds.get(spec.label, 0) + 1


def kind_factors(g: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The factors (lora.kinds names: A, B, hada_w1_a, lokr_w1, diff, dora_scale, ...) among a file module's
    tensors, keyed by their kohya / LyCORIS suffixes."""
    return {_FACTOR.get(s, s): t for s, t in g.items() if s != "alpha" and known_factor(_FACTOR.get(s, s))}


def kind_spec(source: str, mod: str, kind: str, g: Mapping[str, torch.Tensor], factors: dict[str, torch.Tensor],
              scale: torch.Tensor | None, mtype: str, wshape: tuple[int, ...] | None,
              live: bool) -> LayerSpec | list[str]:
    """The LayerSpec of one file module of `kind` (its `factors`, its alpha or A1111 `scale` from `g`) on a
    `mtype` weight of shape `wshape` (checked when `live`), or the problems that make it unusable, one line each."""
    if kind == "lora" and "lora_mid" not in factors and "A" in factors and "B" in factors:
        ktype = mtype if live else ("Conv2d" if factors["A"].dim() == 4 else "Linear")
        try:
            factors["A"], factors["B"] = fit_pair(f"{source}: {mod}", ktype, wshape or None, factors["A"],
                                                  factors["B"], False)
        except AdapterFileError as e:
            return [str(e)]
    problems = check_kind(kind, factors, tuple(wshape) if live and wshape else None, f"{mtype} weight")
    if problems:
        return [f"{mod}: {p}" for p in problems]
    rank = rank_of(kind, factors)
    if kind in ("oft", "boft"):  # alpha is the rotation constraint there, 0 meaning none (lora.kinds)
        alpha = float(g["alpha"].float().item()) if g.get("alpha") is not None and g["alpha"].numel() == 1 else 0.0
        if not (alpha >= 0 and alpha != float("inf")):
            return [f"{mod}: OFT constraint alpha {alpha} must be finite and >= 0"]
    else:
        alpha = _alpha(source, mod, g.get("alpha"), scale, rank or 1)
    a, b = (factors.pop("A"), factors.pop("B")) if kind == "lora" else (None, None)
    return LayerSpec(a, b, alpha, "lora", kind, factors)


def _alpha(source: str, mod: str, alpha: torch.Tensor | None, scale: torch.Tensor | None, rank: int) -> float:
    """A module's alpha: its `alpha` tensor (default: the rank; always checked), or A1111's `scale` (= alpha / rank)
    when given."""
    value = alpha_value(f"{source}: {mod}", alpha, rank)
    return value if scale is None else alpha_value(f"{source}: {mod}.scale", scale, 1) * rank


def _target(mod: str, r: NameResolver) -> tuple[str, str, ComponentInfo, str, tuple[int, ...]] | None:
    """(component, live module, its ComponentInfo, module type, weight shape) of a file module, or None when it
    maps to nothing; type and shape are ("", ()) when the model is not given (info.live False)."""
    target = _resolve(mod, r)
    if target is None:
        return None
    comp, live = target
    info = r.info(comp)
    mtype, wshape = info.module_of(live) or ("", ())
    return comp, live, info, mtype, wshape


def _resolve(mod: str, r: NameResolver) -> tuple[str, str] | None:
    if mod in r.kohya:
        return r.kohya[mod]
    if mod.startswith("diffusion_model."):
        live = r.unet_names.get(mod)
        return ("unet", live) if live else None
    m = _COMFY_TE.match(mod)
    if m:
        comp = COMFY_CLIP[m.group(1)]
        live = r.te_live(comp, m.group(2))
        return (comp, live) if live else None
    # lora_te1_ on a single-encoder model (A1111 and ComfyUI accept it): already in the table via the prefixes.
    return None


# ---- export ----------------------------------------------------------------------------------------------------

BASES = {
    # base: (ss_base_model_version, ss_v2, modelspec.architecture, resolution, prediction_type)
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "512x512", "epsilon"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora", "512x512", "epsilon"),
    "sd2-v": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "768x768", "v"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora", "1024x1024", "epsilon"),
}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def data_region_sha256(blob: bytes) -> str:
    """sha256 of the bytes after the header of a serialised safetensors file (kohya's / A1111's addnet hash)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + n:]).hexdigest()


def _common(values: list[float]) -> float | None:
    return max(set(values), key=values.count) if values else None


def kohya_tensors(adapter: Adapter, base: str, dtype: torch.dtype | None = None,
                  unet_config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya tensors of `adapter` and the ss_network_* metadata describing them (plain alpha / rank scaling).

    dtype None: float16 (what kohya writes), or float32 with a warning when a value would not fit float16 (it would
    become Inf, and loaders refuse the file). An explicit dtype whose range a value exceeds is an error.
    """
    adapter = adapter.plain()
    xl = base == "sdxl"
    comps = adapter.components()
    bad = [c for c in comps if c not in ("unet", "text_encoder", "text_encoder_2")]
    if bad or ("text_encoder_2" in comps and not xl):
        raise ValueError(f"the kohya format holds SD UNet/text-encoder adapters; got components {comps} for base "
                         f"{base!r} (ViT adapters: use fmt='peft'; text_encoder_2 needs base='sdxl')")
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; expected one of {list(BASES)}")
    bmap = naming.unet_block_map(unet_config or naming.STANDARD_UNET_CONFIGS["sdxl"]) if xl else None
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if xl else "lora_te", "text_encoder_2": "lora_te2"}
    rows = []  # (kohya module key, entry, is k x k conv)
    kinds: dict[str, LayerSpec] = {}  # kohya module key -> a layer of another kind, written with LyCORIS names
    for comp in comps:
        for key, spec in adapter.layers(comp).items():
            mod, part = split_key(key)
            if part:
                raise ValueError(f"{comp}.{mod}: fused q/k/v parts have no kohya spelling")
            if comp == "unet":
                name = naming.diffusers_to_ldm(mod, bmap) if xl else mod
            else:
                name = naming.te_to_file(mod)
            kkey = naming.kohya_key(prefixes[comp], name)
            if not spec.is_plain:
                if kkey in kinds:
                    raise AdapterFileError(f"two modules map to the kohya key {kkey}")
                kinds[kkey] = spec
                continue
            e = {"A": spec.A, "B": spec.B, "alpha": float(spec.alpha), "rank": spec.rank}
            rows.append((kkey, e, e["A"].dim() == 4 and e["A"].shape[-1] > 1))
    lin_alpha = _common([e["alpha"] for _, e, conv in rows if not conv])
    conv_alpha = _common([e["alpha"] for _, e, conv in rows if conv])
    tensors: dict[str, torch.Tensor] = {}
    for key, e, conv in rows:
        alpha = conv_alpha if conv else lin_alpha
        b = e["B"]
        if e["alpha"] != alpha:
            b = b.float() * (e["alpha"] / alpha)
        if key + ".lora_down.weight" in tensors:
            raise AdapterFileError(f"two modules map to the kohya key {key}")
        tensors[key + ".lora_down.weight"] = e["A"]
        tensors[key + ".lora_up.weight"] = b
        tensors[key + ".alpha"] = torch.tensor(float(alpha))
    for key, spec in kinds.items():  # each with its own alpha: LyCORIS files carry one per module
        if any(k.startswith(key + ".") for k in tensors):
            raise AdapterFileError(f"two modules map to the kohya key {key}")
        tensors.update(kind_tensors(key, spec))
    dtype = _output_dtype({k: v for k, v in tensors.items() if v.is_floating_point()}, dtype)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    ranks = sorted({int(e["rank"]) for _, e, conv in rows if not conv})
    conv_ranks = sorted({int(e["rank"]) for _, e, conv in rows if conv})
    meta = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else (
                "Dynamic" if ranks else str(conv_ranks[0]) if conv_ranks else "0"),
            "ss_network_alpha": str(float(lin_alpha if lin_alpha is not None else conv_alpha or 0.0))}
    args = {}
    if conv_ranks:
        args = {"conv_dim": str(conv_ranks[0]) if len(conv_ranks) == 1 else "Dynamic",
                "conv_alpha": str(float(conv_alpha))}
    if kinds:  # LyCORIS' own metadata: A1111, ComfyUI and Forge read the tensors; trainers read the algo
        meta["ss_network_module"] = "lycoris.kohya"
        args.update(lycoris_args(kinds.values()))
        if not rows:
            dims = sorted({sp.rank for sp in kinds.values()})
            meta["ss_network_dim"] = str(dims[0]) if len(dims) == 1 else "Dynamic"
            meta["ss_network_alpha"] = str(_common([float(sp.alpha) for sp in kinds.values()]))
    meta["ss_network_args"] = json.dumps(args)
    return tensors, meta


def kind_tensors(key: str, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """The tensors of one layer of another kind than plain LoRA as LyCORIS writes them: `<key>.<factor>` (LoRA's
    A / B / Tucker core as lora_down / lora_up / lora_mid) and `<key>.alpha` for the kinds that have one."""
    if LOKR_ROWS in spec.factors:
        raise ValueError(f"{key}: a window of a LoKr on a fused DiT module (lokr_rows, read from a BFL file), which "
                         "no other tool reads; the DiT kohya export (export(..., 'kohya') of a DiT adapter) writes "
                         "the fused LoKr back")
    out = {f"{key}.{_SUFFIX.get(n, n)}": t for n, t in spec.all_factors.items()}
    if get_kind(spec.kind).uses_alpha:  # (IA)^3, full and norm have none in LyCORIS files
        out[key + ".alpha"] = torch.tensor(float(spec.alpha))
    return out


def lycoris_args(specs: Iterable[LayerSpec]) -> dict[str, str]:
    """LyCORIS' ss_network_args for layers of other kinds: the algo(s) and dora_wd."""
    specs = list(specs)
    algos = sorted({"locon" if sp.kind == "lora" else ("diag-oft" if sp.kind == "oft" else sp.kind) for sp in specs})
    args = {"algo": algos[0] if len(algos) == 1 else ",".join(algos)}
    if any("dora_scale" in sp.factors for sp in specs):
        args["dora_wd"] = "True"
    return args


def _output_dtype(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to write: `dtype`, or float16 when None and every value fits it (else float32, with a warning)."""
    want = torch.float16 if dtype is None else dtype
    if not want.is_floating_point:
        raise ValueError(f"dtype {want}: expected a floating point dtype (float16, bfloat16 or float32)")
    limit = torch.finfo(want).max
    peaks = {k: float(v.detach().abs().max()) for k, v in tensors.items() if v.numel()}
    over = sorted(((v, k) for k, v in peaks.items() if v > limit), reverse=True)
    if not over:
        return want
    peak, layer = over[0]
    what = f"{len(over)} tensor(s) exceed {str(want).removeprefix('torch.')}'s largest value {limit:g} (largest: " \
           f"{layer} = {peak:.6g})"
    if dtype is not None:
        raise ValueError(f"kohya export: {what}, so they would be written as Inf; use dtype float32 or bfloat16 "
                         "(--dtype fp32 / bf16), or leave the dtype out to get float32 for such a file")
    warnings.warn(f"kohya export: {what}; writing this file in float32 instead of float16 so that nothing becomes "
                  "Inf", stacklevel=3)
    return torch.float32


def tag_frequency(captions: list[str] | tuple[str, ...], dataset_dir: str) -> str:
    """kohya's `ss_tag_frequency`: JSON {"<dataset folder name>": {tag: number of captions with it}}, tags being the
    comma-separated parts of each caption (A1111 lists them in its LoRA card)."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in dict.fromkeys(t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return json.dumps({path_name(str(dataset_dir)) or "dataset": counts})


def _training_facts(metadata: Mapping[str, str], trigger_phrase: str | None) -> dict[str, str]:
    """What A1111 shows of a kohya file, from the adapter's own metadata: the base model's name
    (`ss_sd_model_name`, no path), the training resolution, and the tags (`ss_tag_frequency`: the captions the
    trainer recorded, else the trigger phrase)."""
    out: dict[str, str] = {}
    info = AdapterMetadata.from_strings(metadata)
    config = info.training_config if isinstance(info.training_config, dict) else {}
    base_model = info.base_model or config.get("pretrained_model_name_or_path")
    if base_model:
        out["ss_sd_model_name"] = path_name(str(base_model))
    resolution = config.get("resolution")
    if isinstance(resolution, int) and resolution > 0:
        out["modelspec.resolution"] = f"{resolution}x{resolution}"
        out["ss_resolution"] = f"({resolution}, {resolution})"
    if "ss_tag_frequency" not in metadata and trigger_phrase:
        out["ss_tag_frequency"] = tag_frequency([trigger_phrase], config.get("instance_data_dir") or "dataset")
    return out


def resolve_base(base: str | None, adapter: Adapter) -> str:
    """The family to write: `base` ("sd1", "sd2", "sd2-v", "sdxl"); None: the adapter's metadata, else a guess from
    its tensors. Anything else (a pipeline, a UNet) is a TypeError that says what to pass instead."""
    if base is None or base == "unknown":
        base = adapter.info.base
        if base not in BASES:
            base = guess_base({k: v for k, v in adapter.tensors.items() if not k.startswith("full.")})
        return base
    if not isinstance(base, str):
        raise TypeError(f"kohya export: base is a {type(base).__name__}; expected a family name, one of {list(BASES)}, "
                        "and the UNet's config as unet_config (for a pipeline: base=lora_vision.models.pipeline_base("
                        "pipe), unet_config=dict(pipe.unet.config))")
    return base


def export_kohya(adapter: Adapter, path: str | Path, base: str | None = None, dtype: torch.dtype | None = None,
                 title: str | None = None, trigger_phrase: str | None = None,
                 unet_config: Mapping[str, Any] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write `adapter` as a kohya file that A1111, ComfyUI, kohya and diffusers load (see the module docstring).

    base: "sd1", "sd2", "sd2-v" or "sdxl" (None: the adapter's metadata, else guessed from its tensors).
    unet_config: the target UNet's config, for the SGM names of an SDXL UNet whose blocks differ from SDXL 1.0's.
    dtype: None writes float16, or float32 (with a warning naming the layer) when a value exceeds float16's range;
    an explicit dtype that a value would overflow is an error.
    """
    base = resolve_base(base, adapter)
    tensors, net_meta = kohya_tensors(adapter, base, dtype, dict(unet_config) if unet_config is not None else None)
    tensors.update({k: v.to(next(iter(tensors.values())).dtype) for k, v in bundle_tensors(adapter, base).items()})
    from safetensors.torch import save

    digest = data_region_sha256(save(tensors))
    version, v2, arch, res, pred = BASES[base]
    path = Path(path)
    name = title or adapter.metadata.get("modelspec.title") or adapter.metadata.get("ss_output_name") or path.stem
    meta: dict[str, str] = provenance(adapter.metadata)
    meta.update(net_meta)
    meta.update({
        "ss_base_model_version": version, "ss_v2": v2, "ss_output_name": meta.get("ss_output_name", name),
        "sshs_model_hash": digest,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": arch,
        "modelspec.implementation": SGM_IMPLEMENTATION if base == "sdxl" else "diffusers",
        "modelspec.title": name, "modelspec.resolution": res, "modelspec.prediction_type": pred,
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.hash_sha256": "0x" + digest, **AdapterMetadata(base=base).to_strings(),
    })
    if trigger_phrase:
        meta["modelspec.trigger_phrase"] = trigger_phrase
    meta.update(_training_facts(adapter.metadata, meta.get("modelspec.trigger_phrase")))
    meta.update(metadata or {})
    write_safetensors(path, tensors, meta)
    with open(path, "rb") as f:
        written = data_region_sha256(f.read())
    if written != digest:  # the hash must describe the exact bytes on disk (A1111 trusts it)
        raise AdapterFileError(f"{path}: data region hash changed while writing ({written} != {digest})")
    return path


# ---- bundled text embeddings (pivotal tuning) -------------------------------------------------------------------

BUNDLE = "bundle_emb"
_CLIP_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # SDXL's two encoders, A1111's names


def a1111_embedding_tensors(vectors: Mapping[str, torch.Tensor], sdxl: bool) -> dict[str, torch.Tensor]:
    """One token's vectors ({text encoder component: (vectors, width)}) as an A1111 textual-inversion file holds
    them: `emb_params` for SD 1.x / 2.x, `clip_l` and `clip_g` for SDXL."""
    if not sdxl:
        if set(vectors) != {"text_encoder"}:
            raise ValueError(f"an SD 1.x/2.x embedding has vectors for text_encoder only; got {sorted(vectors)}")
        return {"emb_params": vectors["text_encoder"]}
    if set(vectors) != set(_CLIP_NAMES):
        raise ValueError(f"an SDXL embedding needs vectors for text_encoder and text_encoder_2; got {sorted(vectors)}")
    return {_CLIP_NAMES[c]: v for c, v in vectors.items()}


def bundle_tensors(adapter: Adapter, base: str) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` tensors of the adapter's bundled embeddings for a kohya file of `base` (float32)."""
    out: dict[str, torch.Tensor] = {}
    for token, vectors in adapter.embeddings().items():
        for name, t in a1111_embedding_tensors(vectors, base == "sdxl").items():
            key = "string_to_param.*" if name == "emb_params" else name
            out[f"{BUNDLE}.{token}.{key}"] = t.float().contiguous()
    return out


def import_bundle(tensors: Mapping[str, torch.Tensor], source: str = "<tensors>") -> dict[str, torch.Tensor]:
    """The native `embeddings.*` tensors of a kohya file's `bundle_emb.*` keys (AdapterFileError when one is not
    in a spelling A1111 reads, or not a (vectors, width) tensor)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    comps = {"string_to_param.*": "text_encoder", "emb_params": "text_encoder", "clip_l": "text_encoder",
             "clip_g": "text_encoder_2"}
    for key, t in tensors.items():
        if not key.startswith(BUNDLE + "."):
            continue
        token, _, name = key[len(BUNDLE) + 1:].partition(".")
        comp = comps.get(name)
        why = check_token(token)
        if why or comp is None or t.dim() != 2:
            problem = why or (f"shape {tuple(t.shape)}, expected (vectors, width)" if comp else
                              "expected string_to_param.*, clip_l or clip_g after the token")
            raise AdapterFileError(f"{source}: bundled embedding key {key!r}: {problem}")
        if comp in found.get(token, {}):
            raise AdapterFileError(f"{source}: bundled embedding {token!r} has two tensors for {comp} ({key!r})")
        found.setdefault(token, {})[comp] = t
    return embedding_tensors(found)
