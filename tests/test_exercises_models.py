"""Exercises of the model notebooks (07 onwards): each reference agrees with the library, the cases
cover the edges, and wrong answers are explained. One self-contained section per notebook."""


# ---------------------------------------------------------------- 08 text conditioning
# (self-contained: imports inside the tests, so this section can sit anywhere in the file)


def test_08_constants_are_the_librarys():
    from ldm_lib.exercises import text_conditioning as ex08
    from ldm_lib.models import text

    assert (ex08.BOS_ID, ex08.EOS_ID, ex08.CONTEXT_LENGTH) == (text.BOS_ID, text.EOS_ID, text.CONTEXT_LENGTH)


def test_08_exercise_module_does_not_import_transformers():
    """Every exercise notebook imports ldm_lib.exercises: it must not pay transformers' import time."""
    import ast

    from ldm_lib.exercises import text_conditioning as ex08

    tree = ast.parse(open(ex08.__file__, encoding="utf-8").read())
    modules = [
        alias.name if isinstance(node, ast.Import) else (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not any("transformers" in m or m.startswith("models") or ".models" in m for m in modules), modules


def test_08_pad_and_truncate_reference_is_what_tokenize_does():
    import warnings

    import torch

    from ldm_lib.exercises import EXERCISES
    from ldm_lib.models.text import SD2_PAD_TOKEN, clean_caption, load_tokenizer, tokenize

    reference = EXERCISES["pad_and_truncate"].reference
    captions = [
        "a photo of a cat",
        "",
        "a small red circle on a black background",
        " ".join(["red"] * 75),
        " ".join(["red"] * 76),
        " ".join(f"word{i}" for i in range(100)),
        "Hello, world... 100% sure?! naïve café 🎉",
    ]
    for tokenizer in (load_tokenizer(), load_tokenizer(pad_token=SD2_PAD_TOKEN)):
        pieces = tokenizer([clean_caption(c) for c in captions], add_special_tokens=False, verbose=False)
        for max_length in (77, 8):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CaptionTruncatedWarning for the long ones
                expected = tokenize(tokenizer, captions, max_length=max_length)["input_ids"]
            for ids, row in zip(pieces["input_ids"], expected, strict=True):
                got = reference(torch.tensor(ids, dtype=torch.long), max_length, tokenizer.pad_token_id)
                assert torch.equal(got, row), (ids[:5], max_length)


def test_08_causal_mask_reference_is_sdpas_and_clips():
    import torch
    import torch.nn.functional as F

    from ldm_lib.exercises import EXERCISES
    from ldm_lib.models.text import build_text_encoder, load_tokenizer, text_encoder_config, tokenize

    reference = EXERCISES["causal_mask"].reference
    q, k, v = torch.randn(3, 2, 3, 9, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=reference(9)),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
    )
    torch.manual_seed(0)
    encoder = build_text_encoder(text_encoder_config("tiny")).eval()
    encoder.set_attn_implementation("eager")
    ids = tokenize(load_tokenizer(), "a small red circle")["input_ids"]
    with torch.no_grad():
        weights = torch.stack(encoder(input_ids=ids, output_attentions=True).attentions)
    allowed = reference(77)
    assert (weights[..., ~allowed] == 0).all() and (weights[..., allowed] > 0).all()


def test_08_cases_cover_the_edges():
    from ldm_lib.exercises import EXERCISES
    from ldm_lib.exercises.text_conditioning import BOS_ID, EOS_ID

    pad = EXERCISES["pad_and_truncate"]
    assert pad.notebook == EXERCISES["causal_mask"].notebook == "08_text_conditioning"
    cases = pad.cases()
    assert {len(c.args[0]) for c in cases} >= {0, 75, 76, 200}
    assert {c.args[2] for c in cases} == {0, EOS_ID} and {c.args[1] for c in cases} >= {77, 8}
    for case in cases:
        row = pad.reference(*case.args)
        n = min(len(case.args[0]), case.args[1] - 2)
        assert row.shape == (case.args[1],) and row[0] == BOS_ID and row[n + 1] == EOS_ID
        assert (row[n + 2 :] == case.args[2]).all()
    assert {c.args[0] for c in EXERCISES["causal_mask"].cases()} >= {1, 77}


def test_08_other_answers_are_accepted_or_explained():
    import pytest
    import torch

    from ldm_lib.exercises import ExerciseFailure, check
    from ldm_lib.exercises.text_conditioning import BOS_ID, EOS_ID

    def as_list(ids, max_length, pad_id):  # a list of ints is a right answer too
        kept = ids[: max_length - 2].tolist()
        return [BOS_ID, *kept, EOS_ID] + [pad_id] * (max_length - len(kept) - 2)

    assert check("pad_and_truncate", as_list) is True

    def hard_coded_77(ids, max_length, pad_id):
        return torch.tensor(as_list(ids, 77, pad_id))

    with pytest.raises(ExerciseFailure, match="(?s)expected shape \\(8,\\).*max_length = 8"):
        check("pad_and_truncate", hard_coded_77)

    def additive(n):  # the float mask added to the scores: right idea, wrong convention here
        return torch.full((n, n), float("-inf")).triu(1)

    with pytest.raises(ExerciseFailure, match="expected dtype torch.bool"):
        check("causal_mask", additive)


# ---------------------------------------------------------------- 07 autoencoder
# (self-contained: imports inside the tests, so this section can sit anywhere in the file)


def test_07_registered_for_the_notebook_and_reference_passes():
    from ldm_lib.exercises import EXERCISES, check

    def todo(*args):
        raise NotImplementedError

    for name in ("reparameterized_sample", "gaussian_kl"):
        assert EXERCISES[name].notebook == "07_autoencoder"
        assert check(name, EXERCISES[name].reference) is True
        assert check(name, todo) is False


def test_07_references_are_the_closed_forms_on_every_case():
    import torch

    from ldm_lib.exercises import EXERCISES

    sample = EXERCISES["reparameterized_sample"]
    for case in sample.cases():
        mean, logvar, noise = (a.double() for a in case.args)
        expected = mean + torch.exp(0.5 * logvar) * noise
        torch.testing.assert_close(sample.reference(*case.args).double(), expected, rtol=1e-6, atol=1e-6)
    kl = EXERCISES["gaussian_kl"]
    for case in kl.cases():
        mean, logvar = (a.double() for a in case.args)
        dims = tuple(range(1, mean.ndim))
        expected = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=dims)
        got = kl.reference(*case.args)
        assert got.shape == (mean.shape[0],) and got.dtype == case.args[0].dtype, case.description
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_07_cases_cover_the_edges():
    from ldm_lib.exercises import EXERCISES
    from ldm_lib.models.vae import LOGVAR_MAX, LOGVAR_MIN

    for name in ("reparameterized_sample", "gaussian_kl"):
        cases = EXERCISES[name].cases()
        shapes = [tuple(c.args[0].shape) for c in cases]
        assert any(s[0] == 1 for s in shapes), name  # a batch of one
        assert {len(s) for s in shapes} >= {3, 4}, name  # 3-D and 4-D latents
        logvars = [c.args[1] for c in cases]
        assert max(lv.abs().max().item() for lv in logvars) >= 18, name  # large |logvar|
        assert any(lv.min() <= -25 for lv in logvars) and any(lv.max() >= 18 for lv in logvars), name
        # inside the library's clamp, so DiagonalGaussian and the closed form agree
        assert all(LOGVAR_MIN <= lv.min() and lv.max() <= LOGVAR_MAX for lv in logvars), name
        assert any(c.args[0].dtype.is_floating_point and c.args[0].dtype.itemsize == 8 for c in cases), name
        descriptions = [c.description for c in cases]
        assert len(set(descriptions)) == len(descriptions), name


def test_07_reference_sample_is_the_library_posteriors_sample():
    import torch

    from ldm_lib.exercises import EXERCISES
    from ldm_lib.models.vae import DiagonalGaussian

    g = torch.Generator().manual_seed(3)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    drawn = posterior.sample(torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    reference = EXERCISES["reparameterized_sample"].reference
    torch.testing.assert_close(reference(mean, logvar, noise), drawn)


def test_07_kl_reference_agrees_with_monte_carlo():
    import torch

    from ldm_lib.exercises import EXERCISES

    g = torch.Generator().manual_seed(4)
    mean = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 2, 2, generator=g, dtype=torch.float64)
    n = 200_000
    noise = torch.randn(n, *mean.shape, generator=g, dtype=torch.float64)
    z = mean + torch.exp(0.5 * logvar) * noise
    log_q = -0.5 * (logvar + noise**2)  # log N(z; mean, var) without the shared -log(2 pi)/2
    log_p = -0.5 * z**2
    per_sample = (log_q - log_p).sum(dim=(2, 3))  # (n, B)
    estimate, stderr = per_sample.mean(0), per_sample.std(0) / n**0.5
    exact = EXERCISES["gaussian_kl"].reference(mean, logvar)
    assert ((estimate - exact).abs() < 4 * stderr).all(), (estimate, exact, stderr)


def test_07_other_wrong_answers_are_explained():
    import pytest
    import torch

    from ldm_lib.exercises import ExerciseFailure, check

    with pytest.raises(ExerciseFailure, match="(?s)values differ.*Hint: z = mean"):
        check("reparameterized_sample", lambda m, lv, n: m)  # forgot the noise

    def keepdim(m, lv):
        return 0.5 * (m**2 + lv.exp() - 1 - lv).sum(dim=tuple(range(1, m.ndim)), keepdim=True)

    with pytest.raises(ExerciseFailure, match=r"expected shape \(4,\), got \(4, 1, 1, 1\)"):
        check("gaussian_kl", keepdim)

    def float32_kl(m, lv):  # loses the float64 of the inputs
        return (0.5 * (m**2 + lv.exp() - 1 - lv)).float().sum(dim=tuple(range(1, m.ndim)))

    with pytest.raises(ExerciseFailure, match="(?s)expected dtype torch.float64.*float64 inputs"):
        check("gaussian_kl", float32_kl)

    def in_place(m, lv, n):
        return m.add_(torch.exp(0.5 * lv) * n)

    with pytest.raises(ExerciseFailure, match="changed its input in place"):
        check("reparameterized_sample", in_place)


# ---------------------------------------------------------------- 09 unet and attention
# (self-contained: imports inside the tests, so this section can sit anywhere in the file)


def test_09_registered_for_the_notebook_and_reference_passes():
    from ldm_lib.exercises import EXERCISES, check

    def todo(*args):
        raise NotImplementedError

    for name in ("timestep_embedding", "scaled_dot_product_attention"):
        assert EXERCISES[name].notebook == "09_unet_attention"
        assert check(name, EXERCISES[name].reference) is True
        assert check(name, todo) is False


def test_09_exercise_module_imports_only_torch_models():
    """Every exercise notebook imports ldm_lib.exercises: no transformers (seconds of import time)."""
    import ast

    import ldm_lib.models.attention as attention_module
    import ldm_lib.models.unet as unet_module
    from ldm_lib.exercises import unet as ex09

    for module in (ex09, unet_module, attention_module):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        names = [
            alias.name if isinstance(node, ast.Import) else (node.module or "")
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        ]
        assert not any(
            "transformers" in n or n in ("text", "vae") or n.endswith((".text", ".vae")) for n in names
        )


def test_09_timestep_reference_is_the_closed_form_on_every_case():
    import math

    import torch

    from ldm_lib.exercises import EXERCISES

    ex = EXERCISES["timestep_embedding"]
    for case in ex.cases():
        t, dim = case.args
        half = dim // 2
        omega = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
        args = t.double()[:, None] * omega[None, :]
        expected = torch.cat([args.cos(), args.sin(), torch.zeros(len(t), dim % 2, dtype=torch.float64)], 1)
        got = ex.reference(*case.args)
        assert got.shape == (len(t), dim) and got.dtype == torch.float32, case.description
        torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=0, msg=case.description)
        if dim % 2:
            assert (got[:, -1] == 0).all(), case.description


def test_09_timestep_reference_matches_diffusers():
    import pytest

    pytest.importorskip("diffusers", reason="diffusers (the parity reference) is not installed")
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    from ldm_lib.exercises import EXERCISES

    ex = EXERCISES["timestep_embedding"]
    for case in ex.cases():
        theirs = get_timestep_embedding(*case.args, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(
            ex.reference(*case.args), theirs, atol=1e-5, rtol=1e-5, msg=case.description
        )


def test_09_attention_reference_is_the_equation_and_torchs_sdpa():
    import math

    import torch
    import torch.nn.functional as F

    from ldm_lib.exercises import EXERCISES

    ex = EXERCISES["scaled_dot_product_attention"]
    for case in ex.cases():
        q, k, v = case.args
        got = ex.reference(q, k, v)
        assert got.shape == (*q.shape[:-1], v.shape[-1]), case.description
        scores = q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])
        torch.testing.assert_close(got.double(), scores.softmax(-1) @ v.double(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_09_cases_cover_the_edges():
    import math

    import torch

    from ldm_lib.exercises import EXERCISES

    emb_cases = EXERCISES["timestep_embedding"].cases()
    steps = torch.cat([c.args[0].double() for c in emb_cases])
    assert {0.0, 999.0} <= set(steps.tolist())  # both ends of the chain
    assert any(not c.args[0].dtype.is_floating_point for c in emb_cases)  # integer timesteps ...
    fractional = [c for c in emb_cases if c.args[0].dtype.is_floating_point and (c.args[0] % 1 != 0).any()]
    assert fractional  # ... and fractional ones
    assert {c.args[1] % 2 for c in emb_cases} == {0, 1}  # odd and even dims
    assert any(len(c.args[0]) == 1 for c in emb_cases)  # a batch of one
    assert {320, 2} <= {c.args[1] for c in emb_cases}  # SD's width, a single frequency

    att_cases = EXERCISES["scaled_dot_product_attention"].cases()
    shapes_args = [c.args for c in att_cases]
    shapes = [tuple(tuple(a.shape) for a in args) for args in shapes_args]
    assert any(q[2] != k[2] for q, k, v in shapes)  # cross-attention: N != M
    assert any(k[2] == 77 for q, k, v in shapes)  # 77 text tokens
    assert any(q[0] == 1 for q, k, v in shapes)  # a batch of one
    assert any(v[-1] != q[-1] for q, k, v in shapes)  # d_v != d
    assert any(k[2] == 1 for q, k, v in shapes)  # a single key
    largest = max((q @ k.transpose(-2, -1)).abs().max() / math.sqrt(q.shape[-1]) for q, k, _ in shapes_args)
    assert largest > 89  # exp overflows float32 above ~88.7: a naive softmax gives NaN there
    descriptions = [c.description for c in emb_cases + att_cases]
    assert len(set(descriptions)) == len(descriptions)


def test_09_other_answers_are_accepted_or_explained():
    import math

    import pytest
    import torch
    import torch.nn.functional as F

    from ldm_lib.exercises import ExerciseFailure, check

    def with_pow(t, dim):  # another correct way to the same frequencies
        half = dim // 2
        args = t[:, None].float() / 10000 ** (torch.arange(half) / half)
        return F.pad(torch.cat([args.cos(), args.sin()], 1), (0, dim % 2))

    def in_float64(t, dim):  # more precise than the reference: still right
        half = dim // 2
        args = t[:, None].double() * torch.exp(-math.log(10000) * torch.arange(half).double() / half)
        return F.pad(torch.cat([args.cos(), args.sin()], 1).float(), (0, dim % 2))

    assert check("timestep_embedding", with_pow) is True
    assert check("timestep_embedding", in_float64) is True
    assert check("scaled_dot_product_attention", F.scaled_dot_product_attention) is True

    def no_odd_padding(t, dim):
        return with_pow(t, dim - dim % 2)

    with pytest.raises(ExerciseFailure, match=r"(?s)expected shape \(4, 33\), got \(4, 32\).*odd dim"):
        check("timestep_embedding", no_odd_padding)

    def returns_float64(t, dim):
        return in_float64(t, dim).double()

    with pytest.raises(ExerciseFailure, match="expected dtype torch.float32"):
        check("timestep_embedding", returns_float64)

    def naive_exp(q, k, v):
        e = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
        return e / e.sum(-1, keepdim=True) @ v

    with pytest.raises(ExerciseFailure, match="(?s)NaN.*large scores.*subtract each row's maximum"):
        check("scaled_dot_product_attention", naive_exp)

    def forgot_transpose(q, k, v):
        return (q @ k / math.sqrt(q.shape[-1])).softmax(-1) @ v

    with pytest.raises(ExerciseFailure, match="(?s)raised RuntimeError.*on input: self-attention"):
        check("scaled_dot_product_attention", forgot_transpose)
