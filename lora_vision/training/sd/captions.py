"""Caption variants per step: kohya's tag shuffle (--shuffle_caption, --keep_tokens) and caption dropout.

The original captions and the empty prompt are rows of the text table, so with frozen text encoders their
embeddings are cached once. A shuffled caption is new text: it is encoded on the fly, each step, into scratch rows
at the end of the table (without grad when the embeddings are cached; as token ids for the live text encoders when
they train), and only when it is not already a row. The step reads those rows like any other, so the captured CUDA
graph keeps working: the scratch rows are written in place before each replay. All choices are drawn from the
host data generator (checkpointed), so a resumed run draws the same variants.
"""

from __future__ import annotations

import numpy as np
import torch

from .caching import TextTable, encode_text, tokenize


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """kohya's caption shuffle: split at commas, keep the first `keep_tokens` tags in place, shuffle the rest, join
    with ', '."""
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    return ", ".join(fixed + [flex[i] for i in rng.permutation(len(flex))])


class CaptionVariants:
    """Rewrites the text rows of a batch's instance images: the empty prompt at `dropout_rate`, otherwise the
    caption with its tags shuffled (when `shuffle`). `batch` is the most instance rows a step has (the global batch).
    """

    def __init__(self, table: TextTable, tokenizers: list, text_encoders: list, sdxl: bool, dtype: torch.dtype,
                 shuffle: bool, keep_tokens: int, dropout_rate: float, batch: int) -> None:
        self.table, self.tokenizers, self.text_encoders, self.sdxl = table, tokenizers, text_encoders, sdxl
        self.shuffle, self.keep_tokens, self.dropout_rate = shuffle, keep_tokens, dropout_rate
        self.row_of = {p: i for i, p in enumerate(table.prompts)}
        if dropout_rate and "" not in self.row_of:
            raise ValueError("caption dropout needs the empty prompt in the text table; build it with '' among "
                             "the prompts")
        self.empty_row = self.row_of.get("")
        self.first_scratch = len(table.prompts)
        if shuffle:  # `batch` scratch rows after the prompts, filled each step
            table.ids = [torch.cat([i, i[:1].expand(batch, -1).clone()]) for i in table.ids]
            if table.hidden is not None:
                table.hidden = torch.cat([table.hidden, torch.zeros_like(table.hidden[:1]).expand(
                    batch, *table.hidden.shape[1:]).clone()])
            if table.pooled is not None:
                table.pooled = torch.cat([table.pooled, torch.zeros_like(table.pooled[:1]).expand(
                    batch, *table.pooled.shape[1:]).clone()])
        self.encoded = 0
        """How many shuffled captions were encoded so far (the cost of --shuffle_caption)."""

    def rows(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The text rows to use instead of `rows` (table rows of the instance captions); writes the scratch rows."""
        out = rows.copy()
        dropped = (rng.random(rows.shape[0]) < self.dropout_rate if self.dropout_rate
                   else np.zeros(rows.shape[0], dtype=bool))
        out[dropped] = self.empty_row if self.empty_row is not None else 0
        if not self.shuffle:
            return out
        new: list[str] = []
        for i in np.flatnonzero(~dropped):
            variant = shuffle_tags(self.table.prompts[rows[i]], self.keep_tokens, rng)
            if variant in self.row_of:
                out[i] = self.row_of[variant]
            else:
                out[i] = self.first_scratch + len(new)
                new.append(variant)
        if new:
            self._write(new)
        return out

    @torch.no_grad()
    def _write(self, captions: list[str]) -> None:
        ids = tokenize(self.tokenizers, captions)
        end = self.first_scratch + len(captions)
        for dst, src in zip(self.table.ids, ids):
            dst[self.first_scratch:end].copy_(src, non_blocking=True)
        if self.table.hidden is not None:
            hidden, pooled = encode_text(self.text_encoders, ids, self.sdxl)
            self.table.hidden[self.first_scratch:end].copy_(hidden)
            if self.table.pooled is not None:
                self.table.pooled[self.first_scratch:end].copy_(pooled)
        self.encoded += len(captions)
