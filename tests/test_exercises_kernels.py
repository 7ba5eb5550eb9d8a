"""Exercise of notebook 14_flash_attention: the online-softmax update. The reference, applied block
by block, is the softmax; the cases cover the edges (first block, masked blocks, rows with nothing
allowed yet, overflowing scores, old and new maxima); right answers written another way pass; the
known mistakes get their hint."""

import math
import subprocess
import sys

import pytest
import torch

import ldm_lib.exercises.kernels as ex14  # registers the exercise (also when __init__ does not)
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check

NAME = "online_softmax_update"


def _todo(*args):
    raise NotImplementedError


def test_registered_for_notebook_14_and_reference_passes(capsys):
    ex = EXERCISES[NAME]
    assert ex.notebook == "14_flash_attention"
    assert check(NAME, ex.reference) is True
    assert check(NAME, _todo) is False
    assert "still to do" in capsys.readouterr().out


def _blockwise(S, V, width, update):
    """softmax(S) V and logsumexp(S) by ``update`` over blocks of ``width`` columns."""
    R, d = S.shape[0], V.shape[1]
    m, l, acc = (
        torch.full((R,), -math.inf, dtype=S.dtype),
        torch.zeros(R, dtype=S.dtype),
        torch.zeros(R, d, dtype=S.dtype),
    )
    for start in range(0, S.shape[1], width):
        m, l, acc = update(m, l, acc, S[:, start : start + width], V[start : start + width])
    return acc / l[:, None], m + l.log()


@pytest.mark.parametrize("width", [1, 3, 16, 40])
def test_reference_block_by_block_is_the_softmax(width):
    g = torch.Generator().manual_seed(0)
    S = 3 * torch.randn(6, 37, generator=g, dtype=torch.float64)
    V = torch.randn(37, 5, generator=g, dtype=torch.float64)
    S[0, :20] = -math.inf  # the first blocks of row 0 all masked
    S[1, 5:] = -math.inf  # row 1: only its first 5 keys allowed
    S[2] += 1000.0  # would overflow without the max
    S[3, ::2] = -math.inf
    out, lse = _blockwise(S, V, width, EXERCISES[NAME].reference)
    torch.testing.assert_close(out, torch.softmax(S, -1) @ V)
    torch.testing.assert_close(lse, torch.logsumexp(S, -1))


def test_cases_cover_the_edges():
    cases = EXERCISES[NAME].cases()
    descriptions = " | ".join(c.description for c in cases)
    for words in ("first block", "masked", "large scores", "new max", "below the running max", "-inf"):
        assert words in descriptions, words
    first = [c for c in cases if torch.isinf(c.args[0]).all()]
    assert first and all((c.args[1] == 0).all() and (c.args[2] == 0).all() for c in first)
    # a row entirely masked in its block while the running max is finite, and a row that stays at -inf
    assert any(((c.args[3] == -math.inf).all(-1) & torch.isfinite(c.args[0])).any() for c in cases)
    assert any(((c.args[3] == -math.inf).all(-1) & torch.isinf(c.args[0])).any() for c in cases)
    # scores whose exponential overflows float32
    assert any(c.args[3].max() > 88.8 for c in cases)
    # both m' = m in every row and m' > m in every row
    assert any((c.args[3].amax(-1) < c.args[0]).all() for c in cases)
    assert any((c.args[3].amax(-1) > c.args[0]).all() and torch.isfinite(c.args[0]).all() for c in cases)
    for c in cases:  # shapes: m, l (R,), acc (R, d), S (R, C), V (C, d)
        m, l, acc, S, V = c.args
        assert (
            m.shape == l.shape == (S.shape[0],)
            and acc.shape == (S.shape[0], V.shape[1])
            and S.shape[1] == V.shape[0]
        )
        assert all(t.dtype == torch.float32 for t in c.args)


def test_cases_are_deterministic():
    a, b = EXERCISES[NAME].cases(), EXERCISES[NAME].cases()
    for ca, cb in zip(a, b, strict=True):
        for x, y in zip(ca.args, cb.args, strict=True):
            assert torch.equal(x, y)


def test_each_known_mistake_fails_with_its_hint():
    assert len(EXERCISES[NAME].mistakes) >= 5
    for mistake, meaning in EXERCISES[NAME].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(NAME, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_the_named_mistakes_are_the_ones_the_brief_names():
    meanings = " ".join(meaning for _, meaning in EXERCISES[NAME].mistakes)
    assert "acc is not rescaled" in meanings
    assert "l is rescaled with the block's maximum" in meanings
    assert "the max is not subtracted" in meanings
    # and they are wrong where they claim to be
    big = next(c for c in EXERCISES[NAME].cases() if "large scores" in c.description)
    _, l, acc = ex14._no_max_subtracted(*big.args)
    assert not torch.isfinite(l).all()
    masked = next(c for c in EXERCISES[NAME].cases() if "only -inf" in c.description)
    assert torch.isnan(ex14._unguarded_minus_inf(*masked.args)[1]).any()
    assert not torch.isnan(torch.cat([t.flatten() for t in EXERCISES[NAME].reference(*masked.args)])).any()


def test_right_answers_written_another_way_pass():
    def clamped_shift(m, l, acc, S, V):
        m_new = torch.max(m, S.max(dim=1).values)
        shift = m_new.clamp(min=-1e30)  # finite even when every score so far is -inf
        scale = torch.exp(m - shift)
        p = torch.exp(S - shift.unsqueeze(1))
        return m_new, l * scale + p.sum(1), acc * scale.unsqueeze(1) + torch.einsum("rc,cd->rd", p, V)

    def row_by_row(m, l, acc, S, V):
        ms, ls, accs = [], [], []
        for i in range(S.shape[0]):
            m_i = max(float(m[i]), float(S[i].max()))
            if m_i == -math.inf:
                ms.append(m_i), ls.append(float(l[i])), accs.append(acc[i].clone())
                continue
            w = torch.exp(S[i] - m_i)
            ms.append(m_i)
            ls.append(math.exp(float(m[i]) - m_i) * float(l[i]) + float(w.sum()))
            accs.append(math.exp(float(m[i]) - m_i) * acc[i] + w @ V)
        return torch.tensor(ms), torch.tensor(ls), torch.stack(accs)

    assert check(NAME, clamped_shift) is True
    assert check(NAME, row_by_row) is True


def test_other_wrong_answers_are_explained():
    def two_values(m, l, acc, S, V):
        return EXERCISES[NAME].reference(m, l, acc, S, V)[:2]

    with pytest.raises(ExerciseFailure, match="expected a tuple of 3 values"):
        check(NAME, two_values)

    def in_place(m, l, acc, S, V):
        m_new, l_new, acc_new = EXERCISES[NAME].reference(m, l, acc, S, V)
        acc.copy_(acc_new)
        return m_new, l_new, acc

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check(NAME, in_place)


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: it must not import triton (which would fix
    the interpreter off before notebook 14 can turn it on), matplotlib or transformers."""
    code = (
        "import sys, ldm_lib.exercises.kernels; "
        "heavy = ('triton', 'ldm_lib.kernels.flash_attention', 'matplotlib', 'transformers'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
