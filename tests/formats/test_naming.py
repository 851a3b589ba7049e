"""Module-name mappings: diffusers <-> LDM/SGM (as ComfyUI's unet_to_diffusers maps them) on real-topology
tiny-width UNets, kohya's module counts, kohya keys, CLIP and HF ViT transformers 4/5 renames."""

from __future__ import annotations

import pytest
import torch

from lora_vision.formats import naming
from lora_vision.lora.config import LoRAConfig
from lora_vision.lora.inject import resolve_targets


def real_topology_unet(layout: str):
    """The SD 1.5 / SD 2.1 / SDXL block layout at 1/10 width (channel ratios kept: they decide conv_shortcut)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(naming.STANDARD_UNET_CONFIGS[layout])
    n = len(cfg["block_out_channels"])
    cfg.update(block_out_channels=(32, 64, 128, 128)[:n], norm_num_groups=8, attention_head_dim=2,
               cross_attention_dim=16, sample_size=8)
    if layout == "sdxl":
        cfg.update(addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def unet(request):
    return request.param, real_topology_unet(request.param)


# The diffusers -> LDM/SGM block tables of SD 1.x / 2.x and SDXL, row by row.
TABLE_SD = {
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.0": "input_blocks.7.0", "down_blocks.2.attentions.1": "input_blocks.8.1",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.0": "input_blocks.10.0", "down_blocks.3.resnets.1": "input_blocks.11.0",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.2": "output_blocks.2.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.resnets.0": "output_blocks.3.0", "up_blocks.1.attentions.2": "output_blocks.5.1",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.attentions.0": "output_blocks.6.1", "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.resnets.2": "output_blocks.11.0", "up_blocks.3.attentions.2": "output_blocks.11.1",
}
TABLE_XL = {
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0", "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.1": "input_blocks.8.0", "down_blocks.2.attentions.0": "input_blocks.7.1",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.attentions.0": "output_blocks.3.1", "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0": "output_blocks.6.0", "up_blocks.2.resnets.2": "output_blocks.8.0",
}


def test_block_tables(unet):
    layout, model = unet
    bmap = naming.unet_block_map(model.config)
    table = TABLE_XL if layout == "sdxl" else TABLE_SD
    for diff, ldm in table.items():
        assert naming.diffusers_to_ldm(diff, bmap) == ldm, diff
    names = dict(model.named_modules())
    for diff in table:
        assert diff in names, f"{diff} missing from the real-topology {layout} UNet"


def test_every_module_maps_one_to_one(unet):
    layout, model = unet
    bmap = naming.unet_block_map(model.config)
    mods = naming.adaptable_modules(model)
    ldm = {naming.diffusers_to_ldm(n, bmap) for n in mods}
    assert len(ldm) == len(mods)  # no two diffusers modules share an LDM name
    kohya = naming.kohya_lookup("lora_unet", ldm)
    assert len(kohya) == len(mods)
    assert naming.diffusers_to_ldm("down_blocks.1.resnets.0.conv_shortcut", bmap) == "input_blocks.4.0.skip_connection"
    assert naming.diffusers_to_ldm("up_blocks.1.resnets.0.time_emb_proj", bmap) == "output_blocks.3.0.emb_layers.1"
    assert naming.diffusers_to_ldm("conv_in", bmap) == "input_blocks.0.0"
    assert naming.diffusers_to_ldm("time_embedding.linear_2", bmap) == "time_embed.2"


def test_sdxl_example_and_kohya_key():
    model = real_topology_unet("sdxl")
    bmap = naming.unet_block_map(model.config)
    sgm = naming.diffusers_to_ldm("up_blocks.0.attentions.1.transformer_blocks.7.attn2.to_k", bmap)
    assert sgm == "output_blocks.1.1.transformer_blocks.7.attn2.to_k"
    assert naming.kohya_key("lora_unet", sgm) == "lora_unet_output_blocks_1_1_transformer_blocks_7_attn2_to_k"
    assert naming.diffusers_to_ldm("add_embedding.linear_1", bmap) == "label_emb.0.0"


@pytest.mark.parametrize("layout,attn,locon", [("sd1", 192, 86), ("sd2", 192, 86), ("sdxl", 722, 66)])
def test_module_counts_section_1_5(layout, attn, locon):
    model = real_topology_unet(layout)
    n_attn = len(resolve_targets(model, LoRAConfig(targets="unet-attn-ff"))[1])
    n_all = len(resolve_targets(model, LoRAConfig(targets="unet-locon"))[1])
    assert (n_attn, n_all - n_attn) == (attn, locon)


def test_standard_full_size_layout_matches_tiny_width_names():
    for layout in ("sd1", "sdxl"):
        full = set(naming.standard_unet_modules(layout))
        tiny = set(naming.adaptable_modules(real_topology_unet(layout)))
        assert full == tiny
    assert len(naming.standard_unet_modules("sdxl")) == 794  # kohya's SDXL UNet LoRA has 794 Linear/Conv2d modules


def test_kohya_inverse_is_a_lookup():
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.resnets.0.time_emb_proj"]
    table = naming.kohya_lookup("lora_unet", names)
    assert table["lora_unet_mid_block_resnets_0_time_emb_proj"] == "mid_block.resnets.0.time_emb_proj"
    assert "lora_unet_mid_block_resnets_0_time_emb_proj_x" not in table
    with pytest.raises(ValueError, match="ambiguous"):
        naming.kohya_lookup("p", ["a.b_c", "a_b.c"])


def test_clip_names():
    assert naming.te_to_file("encoder.layers.3.mlp.fc1") == "text_model.encoder.layers.3.mlp.fc1"
    assert naming.te_to_file("text_model.encoder.layers.3.mlp.fc1") == "text_model.encoder.layers.3.mlp.fc1"
    assert naming.te_to_live("text_model.encoder.layers.3.mlp.fc1", False) == "encoder.layers.3.mlp.fc1"
    assert naming.te_to_live("encoder.layers.3.mlp.fc1", True) == "text_model.encoder.layers.3.mlp.fc1"
    assert naming.te_to_file("text_projection") == "text_projection"  # outside text_model in transformers 4 too
    assert naming.te_to_live("text_projection", True) == "text_projection"
    from lora_vision.models import build_tiny_sd

    pipe = build_tiny_sd("sdxl")
    for comp in ("text_encoder", "text_encoder_2"):
        assert naming.default_has_text_model(comp) == hasattr(getattr(pipe, comp), "text_model")


def test_hf_vit_v4_v5():
    pairs = {"vit.encoder.layer.3.attention.attention.query": "vit.layers.3.attention.q_proj",
             "vit.encoder.layer.3.attention.attention.value": "vit.layers.3.attention.v_proj",
             "vit.encoder.layer.11.attention.output.dense": "vit.layers.11.attention.o_proj",
             "vit.encoder.layer.0.intermediate.dense": "vit.layers.0.mlp.fc1",
             "vit.encoder.layer.0.output.dense": "vit.layers.0.mlp.fc2", "classifier": "classifier"}
    for v4, v5 in pairs.items():
        assert naming.vit_v4_to_v5(v4) == v5
        assert naming.vit_v5_to_v4(v5) == v4
    from lora_vision.models import build_tiny_hf_vit

    live = set(naming.adaptable_modules(build_tiny_hf_vit()))
    assert {v for v in pairs.values()} - {"vit.layers.3.attention.q_proj", "vit.layers.3.attention.v_proj",
                                         "vit.layers.11.attention.o_proj"} <= live


class _Mixed(torch.nn.Module):
    """Every case the model description tells apart: wrappers (of a Linear and of a LayerNorm), the insides of a
    MultiheadAttention, a norm without weight, a grouped conv, containers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 6)
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2),
                                                               torch.nn.LayerNorm(4), torch.nn.Linear(4, 4))])
        self.bare = torch.nn.LayerNorm(4, elementwise_affine=False)
        self.group = torch.nn.GroupNorm(2, 4)


def test_described_modules_are_looked_up_by_name_exactly_as_the_walk_lists_them(monkeypatch):
    from lora_vision import inject_lora
    from lora_vision.formats.common import describe_models
    from lora_vision.lora.layers import LoRANorm

    model = _Mixed()
    inject_lora(model, LoRAConfig(rank=2, targets=("fc", "attn")))
    model.blocks[0][1] = LoRANorm(model.blocks[0][1])  # what a file's w_norm / b_norm goes in
    walked = {n: (type(m).__name__, tuple(m.in_proj_weight.shape if isinstance(m, torch.nn.MultiheadAttention)
                                            else m.weight.shape)) for n, m in naming.adaptable_modules(model).items()}
    norms = {n: (type(m).__name__, tuple(m.weight.shape)) for n, m in naming.norm_modules(model).items()}
    info = describe_models({"model": model})["model"]
    names = [n for n, _ in model.named_modules()] + ["attn.out_proj", "fc.base", "nope", "fc.nope"]
    for n in names:
        assert (n in info.modules, info.modules.get(n)) == (n in walked, walked.get(n)), n
        assert (n in info.norms, info.norms.get(n)) == (n in norms, norms.get(n)), n
    assert info.module_of("blocks.0.1") == ("LayerNorm", (4,)) and info.module_of("bare") is None
    assert torch.equal(info.weight("fc"), model.fc.base.weight)
    assert dict(info.modules) == walked and dict(info.norms) == norms  # walking them gives the same table

    # A reader asking about a file's names does not walk the model.
    walks = []
    real = torch.nn.Module.named_modules

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self is model:
            walks.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counted)
    info = describe_models({"model": model})["model"]
    assert [info.module_of(n) for n in ("fc", "blocks.0.2")] == [("Linear", (6, 4)), ("Linear", (4, 4))]
    assert walks == []
