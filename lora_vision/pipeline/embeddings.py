"""Bundled text embeddings (pivotal tuning) in diffusers pipelines: new tokens in the tokenizer(s) and rows in the
text encoder(s), added by `load_adapter` and removed by `unload_adapter`.

A token trained as n vectors is added as the words `TOK`, `TOK_1`, ..., `TOK_<n-1>` (diffusers' convention for
multi-vector textual inversion) to each tokenizer, and the text encoder's token embedding grows by those rows;
`expand_tokens` writes `TOK` in a prompt as `TOK TOK_1 ...` (what A1111 does with an embedding's name), and
`lora-vision generate` calls it on every prompt. The pipeline's own tokenizers and embedding modules are kept aside
untouched: loading builds new ones, unloading the last adapter with embeddings puts the originals back (same
objects, same bytes).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..formats import AdapterMismatchError

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def token_names(token: str, n: int) -> list[str]:
    """The words a token of `n` vectors is added as: TOK, TOK_1, ..., TOK_<n-1>."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


@dataclass
class _Original:
    tokenizer: Any
    embedding: nn.Module


@dataclass
class _EmbeddingState:
    originals: dict[str, _Original] = field(default_factory=dict)
    adapters: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)


def _state(pipe: Any) -> _EmbeddingState:
    st = getattr(pipe, "_lora_vision_embeddings", None)
    if st is None:
        st = _EmbeddingState()
        pipe._lora_vision_embeddings = st
    return st


@dataclass
class PreparedEmbeddings:
    """New tokenizers and token embeddings per text encoder, built and checked but not yet in the pipeline."""

    name: str
    embeddings: dict[str, dict[str, torch.Tensor]]
    tokenizers: dict[str, Any]
    modules: dict[str, nn.Module]


def _build(pipe: Any, adapters: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
           originals: Mapping[str, _Original], label: str) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """Tokenizers and embedding modules holding the original vocabulary plus every adapter's tokens, in order."""
    tokenizers, modules = {}, {}
    for comp, orig in originals.items():
        names, rows = [], []
        for per_token in adapters.values():
            for token, per_comp in per_token.items():
                if comp in per_comp:
                    names += token_names(token, per_comp[comp].shape[0])
                    rows.append(per_comp[comp])
        if not names:
            tokenizers[comp], modules[comp] = orig.tokenizer, orig.embedding
            continue
        base = orig.embedding.weight
        vocab, width = base.shape
        tok = copy.deepcopy(orig.tokenizer)
        taken = [n for n in names if n in tok.get_vocab()]
        if taken:
            raise ValueError(f"{label}: token(s) {taken[:3]} are already words of {TOKENIZERS[comp]}; an embedding "
                             "needs a new word: unload the adapter that has it, or rename the token")
        tok.add_tokens(names)
        ids = tok.convert_tokens_to_ids(names)
        if ids != list(range(vocab, vocab + len(names))):
            raise ValueError(f"{label}: {TOKENIZERS[comp]} gave ids {ids[:3]}... to the new tokens {names[:3]}, "
                             f"expected {vocab}, {vocab + 1}, ... after the text encoder's {vocab} rows; the "
                             "tokenizer does not match its text encoder")
        bad = [f"{comp} {tuple(r.shape)}" for r in rows if r.shape[1] != width]
        if bad:
            raise AdapterMismatchError(f"{label}: bundled embedding vectors {bad[:2]} do not fit {comp}, whose "
                                       f"tokens are {width} wide; the file was made for another base model")
        grown = nn.Embedding(vocab + len(names), width, device=base.device, dtype=base.dtype)
        grown.requires_grad_(False)
        with torch.no_grad():
            grown.weight[:vocab] = base
            grown.weight[vocab:] = torch.cat([r.to(base.device, base.dtype) for r in rows])
        tokenizers[comp], modules[comp] = tok, grown
    return tokenizers, modules


def prepare_embeddings(pipe: Any, name: str, embeddings: Mapping[str, Mapping[str, torch.Tensor]],
                       label: str) -> PreparedEmbeddings | None:
    """Check adapter `name`'s bundled embeddings ({token: {component: (vectors, width)}}) against `pipe` and build
    what add_embeddings puts in; nothing in the pipeline changes. None when there are none."""
    if not embeddings:
        return None
    st = _state(pipe)
    comps = sorted({c for per in embeddings.values() for c in per})
    missing = [c for c in comps if getattr(pipe, c, None) is None or getattr(pipe, TOKENIZERS[c], None) is None]
    if missing:
        raise AdapterMismatchError(f"{label}: its bundled embeddings have vectors for {missing}, which "
                                   f"{type(pipe).__name__} does not have; the file was made for another base model")
    loaded = {t for per in st.adapters.values() for t in per}
    clash = sorted(loaded & set(embeddings))
    if clash:
        raise ValueError(f"{label}: embedding token(s) {clash} are already loaded with another adapter; unload it "
                         "first")
    originals = dict(st.originals)
    for comp in comps:
        originals.setdefault(comp, _Original(getattr(pipe, TOKENIZERS[comp]),
                                             getattr(pipe, comp).get_input_embeddings()))
    adapters = {**st.adapters, name: {t: dict(per) for t, per in embeddings.items()}}
    tokenizers, modules = _build(pipe, adapters, originals, label)
    return PreparedEmbeddings(name, adapters[name], tokenizers, modules)


def _install(pipe: Any, tokenizers: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> None:
    for comp, tok in tokenizers.items():
        setattr(pipe, TOKENIZERS[comp], tok)
        getattr(pipe, comp).set_input_embeddings(modules[comp])


def add_embeddings(pipe: Any, prepared: PreparedEmbeddings | None) -> list[str]:
    """Put prepared embeddings into the pipeline; returns their tokens."""
    if prepared is None:
        return []
    st = _state(pipe)
    for comp in prepared.tokenizers:
        st.originals.setdefault(comp, _Original(getattr(pipe, TOKENIZERS[comp]),
                                                getattr(pipe, comp).get_input_embeddings()))
    st.adapters[prepared.name] = prepared.embeddings
    _install(pipe, prepared.tokenizers, prepared.modules)
    return list(prepared.embeddings)


def remove_embeddings(pipe: Any, name: str) -> None:
    """Take adapter `name`'s tokens out of the tokenizers and text encoders (the originals come back when no
    adapter with embeddings is left)."""
    st = _state(pipe)
    if name not in st.adapters:
        return
    rest = {n: e for n, e in st.adapters.items() if n != name}
    tokenizers, modules = _build(pipe, rest, st.originals, name)
    _install(pipe, tokenizers, modules)
    st.adapters = rest
    if not rest:
        st.originals = {}


def expand_tokens(pipe: Any, prompt: str) -> str:
    """`prompt` with each loaded embedding token written as all its words (`TOK` -> `TOK TOK_1 TOK_2`), as A1111
    expands an embedding's name; other text is unchanged."""
    for per_token in _state(pipe).adapters.values():
        for token, per_comp in per_token.items():
            n = max(v.shape[0] for v in per_comp.values())
            prompt = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ".join(token_names(token, n)).replace("\\", r"\\"),
                            prompt)
    return prompt
