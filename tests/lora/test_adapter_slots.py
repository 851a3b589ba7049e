"""Which module a name addresses and whether an adapter can go on it: one rule (lora.inject.adapter_slot), looked
up by name on the load paths and walked over the model (adapter_slots) for targets and the formats' descriptions.
These pin the edges where the lookups and the walk used to answer differently."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_vision as lv
from lora_vision.formats import naming
from lora_vision.formats.common import describe_models
from lora_vision.lora.inject import adapter_slot, adapter_slots
from lora_vision.lora.layers import LoRANorm


class _LinearWithChild(nn.Linear):
    """A Linear holding a module of its own: what is inside a wrapper's base is never a slot."""

    def __init__(self) -> None:
        super().__init__(4, 4)
        self.extra = nn.Linear(4, 4)


class _Edges(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.conv = nn.Conv2d(4, 4, 3)
        self.attn = nn.MultiheadAttention(8, 2)
        self.wattn = nn.MultiheadAttention(8, 2)
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU())
        self.ln = nn.LayerNorm(4)
        self.bare = nn.LayerNorm(4, elementwise_affine=False)
        self.group = nn.GroupNorm(2, 4)
        self.odd = _LinearWithChild()


def _edges() -> nn.Module:
    model = _Edges()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("wattn", "odd")))
    model.ln = LoRANorm(model.ln)
    return model


EDGE_SLOTS = {"fc": "lora", "conv": "lora", "attn": "lora", "wattn": "lora", "seq.0": "lora", "seq.1": "norm",
              "ln": "norm", "bare": "norm", "group": "norm", "odd": "lora"}
MODELS = {"edges": _edges, "Linear": lambda: nn.Linear(4, 4), "MultiheadAttention": lambda: nn.MultiheadAttention(8, 2),
          "LayerNorm": lambda: nn.LayerNorm(4), "wrapper": lambda: lv.LoRALinear(nn.Linear(4, 4))}


@pytest.mark.parametrize("which", MODELS)
def test_the_lookup_by_name_and_the_walk_give_the_same_slots(which):
    """For every name (the model's own, the empty one, names inside wrappers and MultiheadAttention, names it does
    not have) the lookup answers what the walk lists; the formats' descriptions follow the same rule. The model
    itself is never a slot, nor a MultiheadAttention's out_proj or anything inside a wrapper."""
    model = MODELS[which]()
    walked = {n: (m, kind) for n, m, kind in adapter_slots(model)}
    assert {n: kind for n, (_, kind) in walked.items()} == (EDGE_SLOTS if which == "edges" else {})
    names = [n for n, _ in model.named_modules()] + ["", "nope", "fc.nope", "out_proj", "attn.out_proj",
                                                     "wattn.base.out_proj", "odd.base.extra", "fc.base", "seq.0.x"]
    adaptable, norms = naming.adaptable_modules(model), naming.norm_modules(model)
    for n in names:
        found = adapter_slot(model, n)
        assert (found if found is None else (found[0], found[2])) == walked.get(n), n
        if found is not None:
            assert found[1]._modules[n.rsplit(".", 1)[-1]] is found[0]  # the parent it is replaced in
        assert naming.live_module(model, n) is adaptable.get(n), n
        assert naming.live_module(model, n, norms=True) is norms.get(n), n
    assert set(adaptable) == {n for n, (_, kind) in walked.items() if kind == "lora"}
    assert set(norms) == {n for n, (m, kind) in walked.items() if kind == "norm" and n != "bare"}  # has no weight


@pytest.mark.parametrize("which", ["Linear", "MultiheadAttention"])
def test_a_model_that_is_itself_a_linear_or_attention_is_refused_and_left_as_it_was(which):
    """An adapter replaces a module in its parent, so the model itself cannot take one: before, a bare Linear was
    'adapted' through a child named "" that its forward never runs, and a bare MultiheadAttention's out_proj was
    wrapped and its forward then failed. Now the error says so and what to do; nothing changes. The description
    of the bare model lists no module under the empty name."""
    model = MODELS[which]()
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(lv.TargetError, match=rf"in {which}; the model is itself a {which}, and an adapter replaces a "
                                             r"module in its parent: put the model in one \(e\.g\. "
                                             r"nn\.Sequential\(model\)\) and adapt that"):
        lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("re:.*",)))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    info = describe_models({"m": model})["m"]
    assert dict(info.modules) == {} and info.module_of("") is None
    wrapped = nn.Sequential(model)
    assert lv.inject_lora(wrapped, lv.LoRAConfig(rank=2, targets=("re:.*",))) == ["0"]


def test_given_factors_for_a_module_inside_a_wrapped_base_are_refused():
    """The load path's lookup (inject_lora(layers=...)) used to ask only the parent, so a module two levels inside
    a wrapper was taken; now it is a module the model does not have, as for every other path."""
    model = _edges()
    spec = lv.LayerSpec(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)
    with pytest.raises(KeyError, match=r"adapts 1 module\(s\) that _Edges does not have \(first: \['odd.base.extra'\]"):
        lv.inject_lora(model, layers={"odd.base.extra": spec}, name="more")
    assert type(model.odd.base.extra) is nn.Linear


def test_a_norm_without_weight_is_a_slot_whose_refusal_says_why_but_no_description_lists_it():
    """A LayerNorm built without an affine part is addressed (the load path says why it cannot take w_norm) but
    the formats' description leaves it out: it has no weight shape to match a file's factors against."""
    model = _edges()
    spec = lv.LayerSpec(None, None, 1.0, kind="norm", factors={"w_norm": torch.ones(4)})
    with pytest.raises(lv.LoRAStateDictError, match=r"bare: the LayerNorm has no weight \(built without an affine "
                                                    r"part\): w_norm has nothing to update"):
        lv.inject_lora(model, layers={"bare": spec})
    info = describe_models({"m": model})["m"]
    assert info.module_of("bare") is None and info.module_of("group") == ("GroupNorm", (4,))
    assert lv.inject_lora(model, layers={"group": spec}) == ["group"]
