"""Pivotal tuning (--train_text_encoder_ti): new tokens trained as text embeddings together with the LoRA, as in
diffusers' examples/advanced_diffusion_training/train_dreambooth_lora_sdxl_advanced.py.

The tokens `<s0>`, `<s1>`, ... are added to every tokenizer, and `--token_abstraction` (e.g. TOK) in the instance
prompt, the captions and the validation prompt is replaced by them. Each text encoder's token embedding is wrapped
(NewTokenEmbedding): its own rows stay the frozen original tensor, and the new rows are one separate trainable
parameter, so nothing else of the text encoder can change. They start as random vectors with the spread of the
existing rows (diffusers' initialisation). The trained vectors are saved under the token abstraction: A1111 users
write it in their prompts, our pipeline loader adds it to the tokenizers (lora_vision.pipeline.embeddings).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .config import SDTrainConfig

FILE = "token_embeddings.safetensors"  # the vectors in each checkpoint
COMPONENTS = ("text_encoder", "text_encoder_2")


class NewTokenEmbedding(nn.Module):
    """A token embedding with `n` new rows after the `base` embedding's own: ids below base.num_embeddings read the
    frozen base, the others the trainable `vectors` (float32; cast to the base's dtype in forward)."""

    def __init__(self, base: nn.Embedding, vectors: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.vectors = nn.Parameter(vectors.to(base.weight.device, torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        """The base rows and the new ones, as one table (what code that reads `weight` expects)."""
        return torch.cat([self.base.weight, self.vectors.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        old = self.base(ids.clamp(max=vocab - 1))
        new = self.vectors.to(old.dtype)[(ids - vocab).clamp(min=0, max=self.vectors.shape[0] - 1)]
        return torch.where((ids >= vocab)[..., None], new, old)  # no host sync: graph-capturable


class NewTokens:
    """The new tokens of a run: added to every tokenizer and text encoder (`text_encoders` by component)."""

    def __init__(self, cfg: SDTrainConfig, tokenizers: list, text_encoders: Mapping[str, nn.Module]) -> None:
        self.abstraction = cfg.token_abstraction
        self.names = [f"<s{i}>" for i in range(cfg.num_new_tokens_per_abstraction)]
        self.modules: dict[str, NewTokenEmbedding] = {}
        generator = torch.Generator().manual_seed(cfg.seed + 3)  # the same vectors on every process and run
        for (comp, encoder), tokenizer in zip(text_encoders.items(), tokenizers):
            base = encoder.get_input_embeddings()
            vocab = base.num_embeddings
            taken = [n for n in self.names if n in tokenizer.get_vocab()]
            if taken:
                raise ValueError(f"the tokenizer of {comp} already has the token(s) {taken}; pivotal tuning adds "
                                 "new tokens <s0>, <s1>, ...: use a tokenizer without them")
            tokenizer.add_tokens(self.names)
            ids = tokenizer.convert_tokens_to_ids(self.names)
            if ids != list(range(vocab, vocab + len(self.names))):
                raise ValueError(f"the tokenizer of {comp} gave the new tokens ids {ids}, expected them right after "
                                 f"the text encoder's {vocab} rows; the tokenizer does not match its text encoder")
            std = base.weight.detach().float().std().item()
            init = torch.randn(len(self.names), base.embedding_dim, generator=generator) * std
            self.modules[comp] = NewTokenEmbedding(base, init)
            encoder.set_input_embeddings(self.modules[comp])

    def rewrite(self, text: str | None) -> str | None:
        """`text` with the token abstraction replaced by the new tokens."""
        return None if text is None else text.replace(self.abstraction, "".join(self.names))

    def rewrite_captions(self, captions: tuple[str, ...], what: str) -> tuple[str, ...]:
        """The captions with the new tokens; ValueError when no instance caption has the token abstraction."""
        if what == "instance" and not any(self.abstraction in c for c in captions):
            raise ValueError(f"--train_text_encoder_ti: none of the {len(captions)} instance caption(s) contains the "
                             f"token abstraction {self.abstraction!r} (first: {captions[0]!r}), so the new tokens "
                             f"would never train; write {self.abstraction} in --instance_prompt and the captions, or "
                             "set --token_abstraction to the trigger word they use")
        return tuple(self.rewrite(c) for c in captions)

    def original(self, text: str) -> str:
        """`text` with the new tokens written back as the token abstraction."""
        return text.replace("".join(self.names), self.abstraction)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable vectors, one tensor per text encoder."""
        return [m.vectors for m in self.modules.values()]

    def vectors(self) -> dict[str, torch.Tensor]:
        """{component: (tokens, width)} float32 copies on the CPU."""
        return {comp: m.vectors.detach().float().cpu().clone() for comp, m in self.modules.items()}

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """{token abstraction: vectors()}: what the adapter files bundle."""
        return {self.abstraction: self.vectors()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The vectors for a checkpoint file."""
        return self.vectors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Put back the vectors of a checkpoint; ValueError (nothing changed) when they do not fit."""
        bad = [c for c, m in self.modules.items() if c not in tensors or tensors[c].shape != m.vectors.shape]
        if bad or set(tensors) != set(self.modules):
            raise ValueError(f"{source}: its token embeddings {({c: tuple(t.shape) for c, t in tensors.items()})} do "
                             f"not fit this run's {({c: tuple(m.vectors.shape) for c, m in self.modules.items()})}; "
                             "resume with the same --num_new_tokens_per_abstraction and model")
        with torch.no_grad():
            for comp, m in self.modules.items():
                m.vectors.copy_(tensors[comp])
