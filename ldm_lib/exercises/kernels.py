r"""Exercises of notebook 14_flash_attention: the online-softmax update at the heart of flash attention.

- ``online_softmax_update(m, l, acc, S, V)``: one step of the online softmax (Milakov & Gimelshein
  2018, arXiv 1805.02867) as flash attention uses it (Dao et al. 2022, arXiv 2205.14135, Algorithm 1;
  Dao 2023, arXiv 2307.08691). For each of R query rows, ``m`` (R,) is the running maximum of the
  scores seen so far, ``l`` (R,) the running sum of their exponentials and ``acc`` (R, d) the running
  unnormalised output; ``S`` (R, C) is the next block of scores and ``V`` (C, d) its values:

  .. math:: m' = \max\big(m, \max_c S_c\big),\qquad
            \ell' = e^{m - m'}\,\ell + \sum_c e^{S_c - m'},\qquad
            a' = e^{m - m'}\,a + \sum_c e^{S_c - m'}\,V_c

  starting from :math:`m = -\infty`, :math:`\ell = 0`, :math:`a = 0`; after the last block
  :math:`a/\ell = \mathrm{softmax}(S)\,V`. A score of :math:`-\infty` is a masked key. A row whose
  scores so far are all :math:`-\infty` keeps :math:`m' = -\infty`, :math:`\ell' = 0`, :math:`a' = 0`
  (no NaN from :math:`e^{-\infty - (-\infty)}`).

The reference is written here in torch (the library's version lives inside the Triton kernel,
:mod:`ldm_lib.kernels.flash_attention`, which imports triton; every exercise notebook imports this
module, so it imports only torch).
"""

from __future__ import annotations

import torch

from .checker import Case, Exercise, register

NEG_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _online_softmax_update(
    m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, S: torch.Tensor, V: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m_new = torch.maximum(m, S.amax(dim=-1))
    # Shift rows that have seen no allowed key yet (m_new = -inf) by 0: their terms are all 0.
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m - shift)  # e^(m - m'), <= 1: rescales what was summed against the old max
    p = torch.exp(S - shift[:, None])
    return m_new, alpha * l + p.sum(dim=-1), alpha[:, None] * acc + p @ V


# ---------------------------------------------------------------- known mistakes


def _no_acc_rescale(m, l, acc, S, V):
    m_new, l_new, _ = _online_softmax_update(m, l, acc, S, V)
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    return m_new, l_new, acc + torch.exp(S - shift[:, None]) @ V


def _l_with_block_max(m, l, acc, S, V):
    m_new, _, acc_new = _online_softmax_update(m, l, acc, S, V)
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    block_max = S.amax(dim=-1)
    block_max = torch.where(block_max == NEG_INF, torch.zeros_like(block_max), block_max)
    return m_new, torch.exp(m - block_max) * l + torch.exp(S - shift[:, None]).sum(-1), acc_new


def _inverted_rescale(m, l, acc, S, V):
    m_new = torch.maximum(m, S.amax(dim=-1))
    shift = torch.where(m_new == NEG_INF, torch.zeros_like(m_new), m_new)
    alpha = torch.exp(shift - torch.where(m == NEG_INF, shift, m))  # e^(m' - m): grows instead
    p = torch.exp(S - shift[:, None])
    return m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + p @ V


def _no_max_subtracted(m, l, acc, S, V):
    p = torch.exp(S)
    return torch.maximum(m, S.amax(dim=-1)), l + p.sum(-1), acc + p @ V


def _unguarded_minus_inf(m, l, acc, S, V):
    m_new = torch.maximum(m, S.amax(dim=-1))
    alpha = torch.exp(m - m_new)
    p = torch.exp(S - m_new[:, None])
    return m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + p @ V


def _normalised_acc(m, l, acc, S, V):
    m_new, l_new, acc_new = _online_softmax_update(m, l, acc, S, V)
    return m_new, l_new, acc_new / torch.where(l_new == 0, torch.ones_like(l_new), l_new)[:, None]


ONLINE_SOFTMAX_MISTAKES = [
    (
        _no_max_subtracted,
        "the max is not subtracted before exp: large scores overflow to inf (and inf / inf is NaN); "
        "exponentiate S - m', never S itself",
    ),
    (
        _no_acc_rescale,
        "acc is not rescaled: when the maximum grows, what acc summed against the old maximum must be "
        "multiplied by exp(m - m') like l",
    ),
    (
        _l_with_block_max,
        "l is rescaled with the block's maximum; rescale it with the new running maximum, "
        "exp(m - m') with m' = max(m, max S)",
    ),
    (
        _inverted_rescale,
        "the rescaling factor is inverted: it is exp(m - m') <= 1 (the old maximum minus the new one)",
    ),
    (
        _normalised_acc,
        "acc was divided by l: keep acc unnormalised during the loop and divide by l once, at the end",
    ),
    (
        _unguarded_minus_inf,
        "a row whose scores are all -inf so far has m' = -inf, and exp(m - m') = exp(-inf - (-inf)) is "
        "NaN: shift such rows by 0 instead of m' (their l and acc stay 0)",
    ),
]


def _cases() -> list[Case]:
    g = _gen(14)

    def block(rows: int, cols: int, d: int = 3, scale: float = 2.0):
        return scale * torch.randn(rows, cols, generator=g), torch.randn(cols, d, generator=g)

    def state(rows: int, d: int = 3, m_low: float = -1.0, m_high: float = 1.0):
        """A running state from earlier blocks: any max, a positive sum, any accumulator."""
        m = m_low + (m_high - m_low) * torch.rand(rows, generator=g)
        return m, 0.5 + 3 * torch.rand(rows, generator=g), torch.randn(rows, d, generator=g)

    first = (torch.full((4,), NEG_INF), torch.zeros(4), torch.zeros(4, 3))
    S, V = block(4, 5)
    cases = [Case("the first block: m = -inf, l = 0, acc = 0", (*first, S, V))]

    S, V = block(5, 6, scale=1.0)
    cases.append(
        Case(
            "a later block below the running max in every row (m' = m)", (*state(5, m_low=6, m_high=8), S, V)
        )
    )

    S, V = block(5, 4, d=2, scale=1.0)
    cases.append(
        Case("a later block with a new max in every row: l and acc must shrink", (*state(5, 2, -9, -7), S, V))
    )

    m, l, acc = state(6, 4, -2, 2)
    S, V = block(6, 7, d=4)
    cases.append(Case("a later block, some rows with a new max, some without", (m, l, acc, S, V)))

    m, l, acc = state(4)
    S, V = block(4, 5)
    S[1] = NEG_INF  # row 1: the whole block masked (padding): its state must not change
    S[2, ::2] = NEG_INF  # row 2: some keys masked
    cases.append(
        Case("a block with masked keys (-inf scores): row 1 entirely, row 2 partly", (m, l, acc, S, V))
    )

    m, l, acc = (torch.tensor([NEG_INF, NEG_INF, 0.5]), torch.tensor([0.0, 0.0, 1.5]), torch.zeros(3, 2))
    acc[2] = torch.tensor([0.3, -0.7])
    S, V = block(3, 4, d=2)
    S[0] = NEG_INF  # nothing seen yet and nothing allowed now: m stays -inf, l and acc stay 0
    cases.append(
        Case("rows that have seen only -inf scores (row 0 still none after this block)", (m, l, acc, S, V))
    )

    m, l, acc = state(3, 2, 990, 1010)
    S, V = block(3, 5, d=2)
    S = S + 1000.0  # exp(1000) overflows float32 (max about 3.4e38 = e^88.7)
    cases.append(
        Case("large scores (around 1000): exp overflows unless the max is subtracted", (m, l, acc, S, V))
    )

    m, l, acc = state(1, 1)
    cases.append(Case("one row, one key", (m, l, acc, torch.tensor([[0.25]]), torch.tensor([[2.0]]))))
    return cases  # fmt: skip


register(
    Exercise(
        name="online_softmax_update",
        notebook="14_flash_attention",
        hint=(
            "m_new = max(m, S.amax(-1)); alpha = exp(m - m_new); P = exp(S - m_new[:, None]); "
            "l_new = alpha * l + P.sum(-1); acc_new = alpha[:, None] * acc + P @ V; where m_new is -inf "
            "(every score so far masked) use 0 in place of m_new in both exponentials."
        ),
        reference=_online_softmax_update,
        cases=_cases,
        mistakes=ONLINE_SOFTMAX_MISTAKES,
    )
)
