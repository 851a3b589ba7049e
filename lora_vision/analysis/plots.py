"""PNG figures of an analysis report (matplotlib, imported lazily: `pip install lora_vision[viz]`).

Every figure is drawn from the JSON report alone, so plots can be redrawn from a saved report.json.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..io import atomic_path
from .sources import natural_key

# Short labels: "unet.down_blocks.1.attentions.0.transformer_blocks.0" -> "down1.at0.tb0".
_ABBREV = [(r"^text_model\.", ""), (r"down_blocks\.(\d+)", r"down\1"), (r"up_blocks\.(\d+)", r"up\1"),
           (r"mid_block", "mid"),
           (r"attentions\.(\d+)", r"at\1"), (r"transformer_blocks\.(\d+)", r"tb\1"), (r"resnets\.(\d+)", r"res\1"),
           (r"(?:encoder\.)?layers?\.(\d+)", r"layer\1"), (r"blocks\.(\d+)", r"block\1")]
_COMP = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2", "model": "model"}
ABBREV_NOTE = "down1.at0.tb0 = down_blocks.1.attentions.0.transformer_blocks.0; res = resnets; te = text encoder"
# Leaves whose trailing number is part of the layer's own name, not a block index (to_out.0, ff.net.2).
_LEAF_INDEX_PARENTS = {"to_out", "net"}
_INDEX = re.compile(r"^(?:\d+|[a-z_]*_\d+)$")  # "3", or torchvision's "encoder_layer_3"


def _pyplot_free_figure(**kw: Any) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("lora-vision analyze draws its plots with matplotlib, which is not installed; "
                          "run `pip install 'lora_vision[viz]'` (or `pip install matplotlib`), or pass --no-plots "
                          "to write only the JSON report") from None
    return Figure(layout="constrained", **kw)


def split_block_kind(key: str) -> tuple[str, str, str]:
    """(component, block, kind) of a layer key: the block ends at the last index that is not part of the leaf.

    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0 -> (unet, down_blocks.1.attentions.0.
    transformer_blocks.0, attn2.to_out.0); text_encoder.encoder.layers.3.self_attn.q_proj -> (text_encoder,
    encoder.layers.3, self_attn.q_proj).
    """
    comp, _, rest = key.partition(".")
    toks = rest.split(".")
    cut = 0
    for i, t in enumerate(toks[:-1]):
        if _INDEX.match(t) and not (i > 0 and toks[i - 1] in _LEAF_INDEX_PARENTS):
            cut = i + 1
    block = ".".join(toks[:cut]) or "(top)"
    return comp, block, ".".join(toks[cut:])


def short_block(comp: str, block: str) -> str:
    """Abbreviated block label for plots."""
    for pat, rep in _ABBREV:
        block = re.sub(pat, rep, block)
    return f"{_COMP.get(comp, comp)}.{block}" if comp != "unet" else block


def short_name(key: str) -> str:
    """Abbreviated layer label for plots: block label + kind."""
    comp, block, kind = split_block_kind(key)
    return f"{short_block(comp, block)} {kind}"


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path


def _size_field(layers: dict[str, dict]) -> tuple[str, str]:
    """The update-size number of an adapter's plots: relative to the base weight when any layer has it."""
    if any(v.get("relative_norm") is not None for v in layers.values()):
        return "relative_norm", "||ΔW||_F / ||W||_F"
    return "update_norm", "||ΔW||_F"


def plot_update_heatmap(report: dict, path: Path, adapter_index: int = 0) -> Path:
    """Heat map of update size (relative to the base weight when known) by block (rows) and layer kind (columns),
    one panel per model component."""
    import numpy as np

    ad = report["adapters"][adapter_index]
    comps: dict[str, dict[str, dict[str, float | None]]] = {}
    field, label = _size_field(ad["layers"])
    split = {key: split_block_kind(key) for key in ad["layers"]}
    # SD 1.x/2.x have one transformer block per attention block: show its layers on the row of proj_in/proj_out.
    tb = [re.search(r"transformer_blocks\.(\d+)$", b) for _, b, _ in split.values()]
    single_tb = all(m is None or m.group(1) == "0" for m in tb)
    for key, v in ad["layers"].items():
        comp, block, kind = split[key]
        if single_tb:
            block = re.sub(r"\.transformer_blocks\.0$", "", block)
        comps.setdefault(comp, {}).setdefault(block, {})[kind] = v.get(field)
    heights = [max(len(rows), 2) for rows in comps.values()]
    fig = _pyplot_free_figure(figsize=(11, 1.6 + 0.32 * sum(heights) + 0.9 * len(comps)), dpi=100)
    axes = fig.subplots(len(comps), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (comp, rows) in zip(axes, comps.items()):
        kinds = sorted({k for r in rows.values() for k in r}, key=lambda k: natural_key("x." + k))
        blocks = list(rows)
        grid = np.full((len(blocks), len(kinds)), np.nan)
        for i, b in enumerate(blocks):
            for j, k in enumerate(kinds):
                if rows[b].get(k) is not None:
                    grid[i, j] = rows[b][k]
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_facecolor("#dddddd")
        ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [short_block(comp, b) for b in blocks], fontsize=8)
        ax.set_xlabel("layer kind")
        ax.set_ylabel("block")
        ax.set_title(f"{ad['label']}: {comp} — update size {label}", fontsize=10)
        if grid.size <= 400:
            hi = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
            for (i, j), x in np.ndenumerate(grid):
                if np.isfinite(x):
                    ax.text(j, i, f"{x:.2g}", ha="center", va="center", fontsize=7,
                            color="black" if x > 0.6 * hi else "white")
        fig.colorbar(im, ax=ax, label=label, fraction=0.03, pad=0.01)
    fig.supxlabel(ABBREV_NOTE + "; grey = not adapted", fontsize=7, color="#555555")
    return _save(fig, path)


def _integer_x(*axes: Any, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if y:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))


# Figures with one row per layer: 0.13 inch per row up to this many labelled rows; beyond, every n-th layer is
# labelled and the figure stops growing (an SDXL adapter has 700+ layers).
MAX_LABELLED_ROWS = 160


def _rows_height(n: int) -> float:
    return 1.8 + 0.13 * min(n, MAX_LABELLED_ROWS)


def _layer_axis(ax: Any, keys: list[str]) -> None:
    step = math.ceil(len(keys) / MAX_LABELLED_ROWS)
    ticks = list(range(0, len(keys), step))
    ax.set_yticks(ticks, [short_name(keys[i]) for i in ticks], fontsize=6 if len(ticks) > 40 else 7)
    ax.set_ylim(len(keys) - 0.5, -0.5)
    if step > 1:
        ax.set_ylabel(f"layer (every {step}th labelled)", fontsize=8)


def plot_spectra(report: dict, path: Path, adapter_index: int = 0) -> Path:
    """Left: singular values of every update divided by its largest (rows = layers). Right: effective ranks."""
    import numpy as np

    ad = report["adapters"][adapter_index]
    keys = list(ad["layers"])
    width = max(len(v["singular_values"]) for v in ad["layers"].values())
    grid = np.full((len(keys), width), np.nan)
    for i, k in enumerate(keys):
        s = np.asarray(ad["layers"][k]["singular_values"], dtype=float)
        if s.size and s[0] > 0:
            grid[i, : s.size] = s / s[0]
    fig = _pyplot_free_figure(figsize=(11, _rows_height(len(keys))), dpi=100)
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.3, 1]})
    im = ax1.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="magma", vmin=0, vmax=1,
                    interpolation="nearest", extent=(0.5, width + 0.5, len(keys) - 0.5, -0.5))
    ax1.set_xlabel("singular value index i")
    ax1.set_title(f"{ad['label']}: σ_i / σ_1 of each update", fontsize=10)
    _layer_axis(ax1, keys)
    fig.colorbar(im, ax=ax1, label="σ_i / σ_1", fraction=0.04, pad=0.01, location="bottom", aspect=40)
    y = np.arange(len(keys))
    for field, marker, name in (("effective_rank", "o", "entropy effective rank"),
                                ("rank_90", "s", "rank at 90% energy"), ("rank_99", "^", "rank at 99% energy")):
        ax2.scatter([ad["layers"][k][field] for k in keys], y, marker=marker, s=14, label=name, alpha=0.8)
    ranks = [ad["layers"][k]["rank"] for k in keys]
    if len(set(ranks)) == 1:
        ax2.axvline(ranks[0], color="black", lw=1, ls="--", label=f"adapter rank ({ranks[0]})")
    else:
        ax2.scatter(ranks, y, marker="|", s=40, color="black", label="adapter rank")
    ax2.set_xlabel("rank")
    ax2.set_xlim(0, width + 0.5)
    ax2.grid(axis="x", alpha=0.3)
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title("effective rank per layer", fontsize=10)
    _integer_x(ax1, ax2)
    return _save(fig, path)


def _pick_layers(layers: dict[str, dict], report: dict, max_layers: int) -> list[str]:
    """The layers with the largest updates in the first adapter, shown in model order."""
    sizes = report["adapters"][0]["layers"]
    field, _ = _size_field(sizes)
    ranked = sorted(layers, key=lambda k: -(sizes[k].get(field) or 0.0))[:max_layers]
    return [k for k in layers if k in ranked]


def plot_similarity_grid(report: dict, path: Path, max_layers: int = 6) -> Path:
    """The paper's Figure 3: phi(i, j) for a few layers (those with the largest updates)."""
    import numpy as np

    sim = report["similarity"]
    keys = _pick_layers(sim["layers"], report, max_layers)
    if not keys:
        raise ValueError("the two adapters share no layer with the same input size; nothing to compare")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    r1, r2 = (max(len(sim["layers"][k]["phi"]) for k in keys), max(len(sim["layers"][k]["phi"][0]) for k in keys))
    cell = 3.6 / max(r1, r2)  # inches per grid cell, so the squares stay square
    fig = _pyplot_free_figure(figsize=(cols * (cell * r2 + 1.0) + 0.8, rows * (cell * r1 + 1.1) + 0.5), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    a, b = (ad["label"] for ad in report["adapters"])
    for ax, k in zip(axes, keys):
        phi = np.asarray(sim["layers"][k]["phi"], dtype=float)
        im = ax.imshow(phi, cmap="viridis", vmin=0, vmax=1, interpolation="nearest", origin="upper",
                       extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
        ax.set_title(short_name(k), fontsize=8)
        ax.set_xlabel(f"j (top-j directions of {b})", fontsize=8)
        ax.set_ylabel(f"i (top-i directions of {a})", fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_x(ax, y=True)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[: len(keys)]), label="φ(i, j)", fraction=0.03, pad=0.02)
    space = "right-singular vectors of A" if sim["space"] == "A" else "right-singular vectors of the update"
    fig.suptitle(f"subspace similarity φ(i, j) = ||U_i^T V_j||_F^2 / min(i, j), {space}", fontsize=10)
    return _save(fig, path)


def plot_similarity_layers(report: dict, path: Path) -> Path:
    """φ(i, i) for every shared layer (rows) and i (columns): how far the two top-i subspaces agree."""
    import numpy as np

    sim = report["similarity"]
    keys = list(sim["layers"])
    width = max(len(v["phi_diag"]) for v in sim["layers"].values())
    grid = np.full((len(keys), width), np.nan)
    for r, k in enumerate(keys):
        d = sim["layers"][k]["phi_diag"]
        grid[r, : len(d)] = d
    fig = _pyplot_free_figure(figsize=(7, _rows_height(len(keys))), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=(0.5, width + 0.5, len(keys) - 0.5, -0.5))
    _layer_axis(ax, keys)
    _integer_x(ax)
    a, b = (ad["label"] for ad in report["adapters"])
    ax.set_title(f"φ(i, i) between {a} and {b} per layer", fontsize=10)
    dims = sorted({v["input_dim"] for v in sim["layers"].values() if "input_dim" in v})
    note = "random i-dim subspaces of R^n: E φ(i, i) = i / n"
    if dims:
        note += f" (n = {dims[0]}" + (f" to {dims[-1]})" if len(dims) > 1 else ")")
    ax.set_xlabel(f"i (top-i directions of both adapters)\n{note}", fontsize=9)
    fig.colorbar(im, ax=ax, label="φ(i, i)", fraction=0.05, pad=0.02)
    return _save(fig, path)


def plot_amplification(report: dict, path: Path, adapter_index: int = 0) -> Path:
    """Section 7.3 per layer: ||U^T W V||_F for the update's, W's own top and random directions; and ||ΔW||_F."""
    import numpy as np

    ad = report["adapters"][adapter_index]
    keys = [k for k, v in ad["layers"].items() if v.get("amplification", {}).get("k")]
    if not keys:
        raise ValueError("no layer has amplification numbers (needs --base and non-zero updates)")
    fig = _pyplot_free_figure(figsize=(11, _rows_height(len(keys))), dpi=100)
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.4, 1]})
    y = np.arange(len(keys))
    amp = [ad["layers"][k]["amplification"] for k in keys]
    for field, marker, name in (("proj_base_top", "s", "W's top-k directions"),
                                ("proj_update", "o", "the update's top-k directions"),
                                ("proj_random", "x", "random directions")):
        ax1.scatter([max(a[field], 1e-12) for a in amp], y, marker=marker, s=16, label=name)
    ax1.scatter([ad["layers"][k]["update_norm"] for k in keys], y, marker="|", s=40, color="black",
                label="||ΔW||_F")
    ax1.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    # Ticks at 1, 2, 5 x 10^k as plain numbers: a narrow log range would otherwise get one label, or overlaps.
    ax1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("||U^T W V||_F  (k = numerical rank of the update)")
    ax1.legend(fontsize=7, loc="lower left")
    ax1.grid(axis="x", alpha=0.3)
    ax1.set_title(f"{ad['label']}: how strongly W acts along each set of directions", fontsize=10)
    _layer_axis(ax1, keys)
    ax2.barh(y, [a["amplification"] or 0.0 for a in amp], color="#4c72b0")
    ax2.axvline(1.0, color="black", lw=1, ls="--")
    ax2.set_xlabel("amplification factor ||ΔW||_F / ||U^T W V||_F")
    ax2.grid(axis="x", alpha=0.3)
    ax2.set_title("amplification", fontsize=10)
    return _save(fig, path)
