"""Exercises of notebook 15_scaling_up: the references are PyTorch's FLOP counter, which agrees with
the closed forms the notebook teaches; right answers written another way pass; known mistakes get
their hint; the cases cover strides, odd sizes, cross-attention and the MFU units."""

import math
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ldm_lib.exercises.scaling  # noqa: F401  (registers the exercises, also when __init__ does not)
from ldm_lib.exercises import EXERCISES, ExerciseFailure, check
from ldm_lib.models.attention import attention

NAMES = ("conv2d_flops", "attention_flops", "model_flops_utilization")


def _todo(*args):
    raise NotImplementedError


def test_registered_for_notebook_15_and_reference_passes(capsys):
    for name in NAMES:
        ex = EXERCISES[name]
        assert ex.notebook == "15_scaling_up"
        assert check(name, ex.reference) is True
        assert check(name, _todo) is False
    assert "still to do" in capsys.readouterr().out


def test_conv_reference_is_the_closed_form_and_a_real_layer():
    ex = EXERCISES["conv2d_flops"]
    for case in ex.cases():
        b, cin, cout, h, w, k, s = case.args
        h_out, w_out = math.ceil(h / s), math.ceil(w / s)
        assert ex.reference(*case.args) == 2 * b * cin * cout * k * k * h_out * w_out, case.description
    # a real nn.Conv2d on CPU tensors, with its bias: the bias is not counted
    layer = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = layer(torch.randn(3, 8, 7, 9))
    assert out.shape == (3, 16, 4, 5)
    assert counter.get_total_flops() == ex.reference(3, 8, 16, 7, 9, 3, 2)


def test_attention_reference_is_the_closed_form_and_the_library_math_backend():
    ex = EXERCISES["attention_flops"]
    for case in ex.cases():
        b, h, n, m, d = case.args
        assert ex.reference(*case.args) == 4 * b * h * n * m * d, case.description
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        attention(q, k, v, backend="math")
    assert counter.get_total_flops() == ex.reference(2, 4, 10, 6, 8)


def test_cases_cover_the_edges():
    conv = EXERCISES["conv2d_flops"].cases()
    assert {c.args[6] for c in conv} == {1, 2} and {c.args[5] for c in conv} >= {1, 3, 5}
    assert any(c.args[6] == 2 and (c.args[3] % 2 or c.args[4] % 2) for c in conv)  # odd size, stride 2
    attn = EXERCISES["attention_flops"].cases()
    assert any(c.args[2] != c.args[3] for c in attn) and any(c.args[2] == c.args[3] for c in attn)
    assert any(c.args[1] > 1 for c in attn) and any(c.args[0] > 1 for c in attn)
    mfu = [
        EXERCISES["model_flops_utilization"].reference(*c.args)
        for c in EXERCISES["model_flops_utilization"].cases()
    ]
    assert all(0 < value < 1 for value in mfu)


@pytest.mark.parametrize("name", NAMES)
def test_each_known_mistake_fails_with_its_hint(name):
    for mistake, meaning in EXERCISES[name].mistakes:
        with pytest.raises(ExerciseFailure) as info:
            check(name, mistake)
        message = str(info.value)
        assert "on input:" in message and "Hint:" in message
        assert f"Your result matches a known mistake: {meaning}" in message, (meaning, message)


def test_right_answers_written_another_way_pass():
    def conv_ceil(b, cin, cout, h, w, k, s):
        return 2.0 * b * cin * cout * k**2 * math.ceil(h / s) * math.ceil(w / s)  # a float is fine

    def attention_per_matmul(b, h, n, m, d):
        scores = 2 * n * d * m  # (n x d) @ (d x m)
        mix = 2 * n * m * d  # (n x m) @ (m x d)
        return b * h * (scores + mix)

    def mfu_in_steps(flops, rate, peak):
        achieved_tflops = flops * rate / 1e12
        return achieved_tflops / peak

    assert check("conv2d_flops", conv_ceil) is True
    assert check("attention_flops", attention_per_matmul) is True
    assert check("model_flops_utilization", mfu_in_steps) is True


def test_other_wrong_answers_are_explained():
    with pytest.raises(ExerciseFailure, match=r"expected 9.43718e\+07, got 9.43718e\+06"):
        check("conv2d_flops", lambda b, cin, cout, h, w, k, s: 2 * b * cin * cout * k * k * h * w / 10)
    with pytest.raises(ExerciseFailure, match="raised ZeroDivisionError"):
        check("model_flops_utilization", lambda f, r, p: f * r / 0)


def test_exercise_module_is_cheap_to_import():
    """Every exercise notebook imports the registry: no trainer, matplotlib or transformers."""
    code = (
        "import sys, ldm_lib.exercises.scaling; "
        "heavy = ('ldm_lib.training', 'matplotlib', 'transformers', 'yaml'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
