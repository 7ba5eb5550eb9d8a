"""Exercises of notebook 08_text_conditioning: CLIP's 77-token layout and the causal mask.

- ``pad_and_truncate(token_ids, max_length, pad_id)``: sub-word ids (no special tokens) ->
  ``[start, w_1..w_n, end, pad...]`` of length ``max_length``, ``n <= max_length - 2`` (Radford et al.
  2021, arXiv 2103.00020; what :func:`ldm_lib.models.text.tokenize` does after BPE).
- ``causal_mask(n)``: the ``(n, n)`` boolean mask of CLIP's text transformer, True where query ``i``
  may attend to key ``j``, i.e. ``j <= i`` (Vaswani et al. 2017, arXiv 1706.03762, §3.2.3).

This module does not import :mod:`ldm_lib.models.text`: that pulls in transformers (seconds of
import time) and every exercise notebook imports ``ldm_lib.exercises``. The two ids below are CLIP's
(tests check that they equal the library's ``BOS_ID`` and ``EOS_ID``).
"""

from __future__ import annotations

import torch

from .checker import Case, Exercise, register

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>; also SD1's pad id (SD2 pads with 0, the token "!")
CONTEXT_LENGTH = 77


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- pad_and_truncate


def _pad_and_truncate(token_ids: torch.Tensor, max_length: int, pad_id: int) -> torch.Tensor:
    r""":math:`[\text{start}, w_1, \dots, w_n, \text{end}, \text{pad}, \dots]`, with
    :math:`n = \min(\text{len}, \text{max\_length} - 2)`: the first sub-words are kept, and the end
    token always."""
    kept = token_ids[: max_length - 2]
    row = torch.full((max_length,), pad_id, dtype=torch.long)
    row[0] = BOS_ID
    row[1 : 1 + len(kept)] = kept
    row[1 + len(kept)] = EOS_ID
    return row


def _pad_and_truncate_list(token_ids, max_length, pad_id):
    return _pad_and_truncate(token_ids, max_length, pad_id).tolist()


def _drop_eos_when_cut(token_ids, max_length, pad_id):
    row = torch.full((max(max_length, len(token_ids) + 2),), pad_id, dtype=torch.long)
    row[0], row[1 : 1 + len(token_ids)], row[1 + len(token_ids)] = BOS_ID, token_ids, EOS_ID
    return row[:max_length]


def _no_bos(token_ids, max_length, pad_id):
    kept = token_ids[: max_length - 1]
    row = torch.full((max_length,), pad_id, dtype=torch.long)
    row[: len(kept)], row[len(kept)] = kept, EOS_ID
    return row


def _keep_last(token_ids, max_length, pad_id):
    room = max_length - 2
    return _pad_and_truncate(token_ids[-room:] if len(token_ids) > room else token_ids, max_length, pad_id)


def _pad_and_truncate_cases() -> list[Case]:
    g = _gen(8)

    def words(n: int) -> torch.Tensor:  # random sub-word ids, never a special token
        return torch.randint(0, BOS_ID, (n,), generator=g)

    cat = torch.tensor([320, 1125, 539, 320, 2368])  # "a photo of a cat" (CLIP ids, no specials)
    empty = torch.zeros(0, dtype=torch.long)
    w75, w76, w200, w10 = words(75), words(76), words(200), words(10)
    return [
        Case(
            "'a photo of a cat' (5 sub-words), SD1 padding: pad_id = 49407, the end token", (cat, 77, EOS_ID)
        ),
        Case("'a photo of a cat' (5 sub-words), SD2 padding: pad_id = 0", (cat, 77, 0)),
        Case("the empty caption '' (no sub-words), SD1 padding", (empty, 77, EOS_ID)),
        Case("the empty caption '' (no sub-words), SD2 padding", (empty, 77, 0)),
        Case("exactly 75 sub-words: they fit with no padding and nothing cut", (w75, 77, EOS_ID)),
        Case("76 sub-words: one too many; the last sub-word goes, the end token stays", (w76, 77, EOS_ID)),
        Case("200 sub-words, SD1 padding", (w200, 77, EOS_ID)),
        Case("200 sub-words, SD2 padding", (w200, 77, 0)),
        Case("10 sub-words with max_length = 8 (don't hard-code 77)", (w10, 8, EOS_ID)),
        Case("5 sub-words with max_length = 8, SD2 padding", (cat, 8, 0)),
    ]


register(
    Exercise(
        name="pad_and_truncate",
        notebook="08_text_conditioning",
        hint=(
            "Keep the first max_length - 2 sub-words, then build [BOS_ID, *kept, EOS_ID] and fill the rest "
            "up to max_length with pad_id; return a 1-D torch.long tensor of length max_length."
        ),
        reference=_pad_and_truncate,
        cases=_pad_and_truncate_cases,
        accepted=[_pad_and_truncate_list],  # a list of ints is also a right answer
        mistakes=[
            (
                lambda ids, n, pad: _pad_and_truncate(ids, n, 0),
                "you padded with 0 whatever pad_id says; SD1 pads with the end token, 49407",
            ),
            (
                lambda ids, n, pad: _pad_and_truncate(ids, n, EOS_ID),
                "you padded with the end token whatever pad_id says; SD2 pads with 0",
            ),
            (_no_bos, "the start token BOS_ID (49406) is missing at position 0"),
            (
                _drop_eos_when_cut,
                "a long caption lost its end token: cut the sub-words to max_length - 2 first, "
                "then add the end token",
            ),
            (
                _keep_last,
                "you kept the last sub-words; CLIP keeps the first max_length - 2 and cuts the rest",
            ),
        ],
    )
)


# ---------------------------------------------------------------- causal_mask


def _causal_mask(n: int) -> torch.Tensor:
    r""":math:`M_{ij} = [\,j \le i\,]`: query :math:`i` sees keys :math:`0..i` (itself and earlier tokens)."""
    return torch.ones(n, n, dtype=torch.bool).tril()


register(
    Exercise(
        name="causal_mask",
        notebook="08_text_conditioning",
        hint=(
            "Row i (the query) is True at columns j <= i (the keys it may see): a lower triangle, "
            "diagonal included, dtype torch.bool."
        ),
        reference=_causal_mask,
        cases=lambda: [
            Case("n = 5", (5,)),
            Case("n = 77, CLIP's context length", (77,)),
            Case("n = 1: a single token sees itself", (1,)),
            Case("n = 2", (2,)),
        ],
        mistakes=[
            (
                lambda n: torch.ones(n, n, dtype=torch.bool).triu(),
                "your mask is transposed: rows are queries, so row i must be True for columns j <= i",
            ),
            (
                lambda n: torch.ones(n, n, dtype=torch.bool).triu(1),
                "True marks the blocked positions here (as in nn.MultiheadAttention's boolean attn_mask); "
                "this exercise, like F.scaled_dot_product_attention, wants True = may attend",
            ),
            (
                lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1),
                "the diagonal is missing: every token also attends to itself (j <= i, not j < i)",
            ),
        ],
    )
)
