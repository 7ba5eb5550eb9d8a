"""CLIP tokenizer and text encoder (ldm_lib.models.text).

How the ids are checked against CLIP's: the reference is open_clip's own ``SimpleTokenizer``
(a copy of OpenAI CLIP's tokenizer), loaded straight from ``open_clip/tokenizer.py`` by file path,
because ``import open_clip`` needs torchvision. That file imports ftfy, which the course does not
install: if ftfy is missing, a stand-in whose ``fix_text`` is NFC normalisation takes its place.
That is what ftfy.fix_text does to every caption in the parity lists below (checked with ftfy
6.3.1): they avoid the typography that ftfy rewrites (curly quotes, ligatures, full-width forms),
which a separate test checks against ftfy's documented output.
"""

import importlib.util
import json
import random
import sys
import types
import unicodedata
import warnings

import pytest
import torch
from transformers import CLIPTextConfig

from ldm_lib.data.shapes import BACKGROUNDS, COLORS, SHAPES, SIZES, make_caption
from ldm_lib.models.text import (
    BOS_ID,
    CONTEXT_LENGTH,
    EOS_ID,
    SD2_PAD_TOKEN,
    VOCAB_SIZE,
    CaptionTruncatedWarning,
    TextEncoderConfig,
    bpe_vocab_path,
    build_text_encoder,
    bytes_to_unicode,
    clean_caption,
    clip_vocab_and_merges,
    empty_prompt_embedding,
    encode_text,
    load_tokenizer,
    text_encoder_config,
    tokenize,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference():
    """open_clip's SimpleTokenizer (OpenAI CLIP's code), loaded without importing open_clip."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("ftfy") is None:
            stand_in = types.ModuleType("ftfy")
            stand_in.fix_text = lambda text: unicodedata.normalize("NFC", text)
            mp.setitem(sys.modules, "ftfy", stand_in)
        mp.setenv("TOKENIZERS_PARALLELISM", "false")  # the module sets it; restore it afterwards
        spec = importlib.util.spec_from_file_location(
            "_clip_reference", bpe_vocab_path().parent / "tokenizer.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.SimpleTokenizer(bpe_path=str(bpe_vocab_path()))


SHAPES_CAPTIONS = [
    make_caption({"size": s, "color": c, "shape": sh, "background": b})
    for s in SIZES
    for c in COLORS
    for sh in SHAPES
    for b in BACKGROUNDS
    if c != b
]
HAND_CAPTIONS = [
    "a photo of a cat",
    "A Small RED Circle on a BLACK background!!",
    "Hello, world... it's 2024; it costs $3.50 (approx.) -- 100% sure?!",
    "I'll say we've seen they're here, don't you'd think I'm",
    "e-mail: someone@example.com #hashtag @user http://x.org/a?b=c&d=e",
    "naïve café déjà vu, façade, Straße, İstanbul, ΣΊΣΥΦΟΣ ΟΔΟΣ ΣΑΣ",
    "cafe\u0301 (decomposed accent)",
    "東京タワー and 서울 and Москва and القاهرة",
    "emoji 🎉🎉 👍🏽 ❤️",
    "x² ½ ① ninety9 3.14159",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39;",
    "   lots   of\tspace\nand lines  ",
    "",
    "!!!???...,,,;;;",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def _random_captions(n: int, seed: int = 0) -> list[str]:
    # No Latin-1 pairs that ftfy could read as mojibake, no typography it rewrites.
    alphabet = [chr(c) for c in range(32, 127)] + list("éüñçΩπдж中文字日本語한국어ا🎉👍\u0301\t\n\u00a0")
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


# ---------------------------------------------------------------- vocabulary and ids


def test_vocabulary_is_clips(tokenizer):
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == len(tokenizer) == VOCAB_SIZE == 49408
    assert len(merges) == 48894
    assert vocab["<|startoftext|>"] == tokenizer.bos_token_id == BOS_ID == 49406
    assert vocab["<|endoftext|>"] == tokenizer.eos_token_id == EOS_ID == 49407
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
    assert vocab["a"] == 64 and vocab["a</w>"] == 320 and vocab["".join(merges[0])] == 512
    # Published CLIP ids (e.g. transformers' CLIP docs): "a photo of a cat".
    ids = tokenize(tokenizer, "a photo of a cat")["input_ids"][0, :7].tolist()
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(
    "captions", [SHAPES_CAPTIONS, HAND_CAPTIONS, _random_captions(300)], ids=["shapes", "hand", "random"]
)
def test_ids_identical_to_clips_own_tokenizer(tokenizer, reference, captions):
    ours = tokenizer([clean_caption(c) for c in captions], add_special_tokens=False)["input_ids"]
    theirs = [reference.encode(c) for c in captions]
    mismatches = [(c, a, b) for c, a, b in zip(captions, ours, theirs, strict=True) if a != b]
    assert not mismatches, mismatches[:3]


def test_full_rows_match_clip_including_truncation_and_padding(reference):
    captions = [*SHAPES_CAPTIONS[:5], "", " ".join(f"word{i}" for i in range(60)), "y" * 500]
    expected = reference(captions)  # open_clip: (B, 77), zero padding, end token forced at 77
    with pytest.warns(CaptionTruncatedWarning):
        sd2 = tokenize(load_tokenizer(pad_token=SD2_PAD_TOKEN), captions)
    torch.testing.assert_close(sd2["input_ids"], expected, rtol=0, atol=0)
    with pytest.warns(CaptionTruncatedWarning):
        sd1 = tokenize(load_tokenizer(), captions)
    expected_sd1 = torch.where(sd1["attention_mask"].bool(), expected, EOS_ID)
    torch.testing.assert_close(sd1["input_ids"], expected_sd1, rtol=0, atol=0)


def test_cleaning_reproduces_ftfy_on_typography(tokenizer):
    # ftfy.fix_text (6.3.1) output, which CLIP tokenizes: quotes straightened, ligatures split,
    # full-width narrowed, Windows-1252 C1 controls read, invisible characters dropped.
    pairs = {
        "It’s a “quoted” ‘word’": "it's a \"quoted\" 'word'",
        "ﬁne ﬂowers": "fine flowers",
        "ＦＵＬＬ　ｗｉｄｔｈ１２": "full width12",
        "\x93smart\x94 \x85": '"smart" …',
        "zero\ufeffwidth\x7f": "zerowidth",
        "&amp;amp; &quot;": '& "',
    }
    for raw, fixed in pairs.items():
        assert clean_caption(raw) == fixed
        torch.testing.assert_close(
            tokenize(tokenizer, raw)["input_ids"], tokenize(tokenizer, fixed)["input_ids"]
        )


# ---------------------------------------------------------------- padding, truncation, empty prompt


def test_padding_to_77_and_attention_mask(tokenizer):
    batch = tokenize(tokenizer, ["a red circle", "a large blue square on a white background"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, CONTEXT_LENGTH) and ids.dtype == mask.dtype == torch.long
    assert mask.sum(1).tolist() == [3 + 2, 8 + 2]
    for row, n in zip(ids, mask.sum(1).tolist(), strict=True):
        assert row[0] == BOS_ID and row[n - 1] == EOS_ID and (row[n:] == EOS_ID).all()
    assert mask[0, :5].tolist() == [1] * 5 and not mask[0, 5:].any()
    sd2 = tokenize(load_tokenizer(pad_token=SD2_PAD_TOKEN), "a red circle")["input_ids"][0]
    assert sd2[:5].tolist() == ids[0, :5].tolist() and (sd2[5:] == 0).all()
    assert tokenize(tokenizer, "a red circle", max_length=8)["input_ids"].shape == (1, 8)


def test_empty_prompt_is_start_end_pad(tokenizer):
    batch = tokenize(tokenizer, "")
    assert batch["input_ids"][0].tolist() == [BOS_ID, EOS_ID] + [EOS_ID] * 75
    assert batch["attention_mask"][0].tolist() == [1, 1] + [0] * 75
    assert tokenize(load_tokenizer(pad_token="!"), "")["input_ids"][0].tolist() == [BOS_ID, EOS_ID] + [0] * 75


def test_truncation_warns_and_names_the_cut_words(tokenizer):
    caption = " ".join(["red"] * 75) + " purple elephant"
    with pytest.warns(CaptionTruncatedWarning) as record:
        batch = tokenize(tokenizer, ["a cat", caption])
    (warning,) = record
    message = str(warning.message)
    assert "caption 1" in message and "'purple elephant'" in message and "77" in message
    red = tokenizer.convert_tokens_to_ids("red</w>")
    assert batch["input_ids"][1].tolist() == [BOS_ID] + [red] * 75 + [EOS_ID]
    assert batch["attention_mask"][1].all()
    # Exactly 75 sub-words fit: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(tokenizer, " ".join(["red"] * 75))


# ---------------------------------------------------------------- tokenizer folders (real checkpoints)


def test_tokenizer_loads_from_saved_and_sd_style_folders(tokenizer, tmp_path):
    captions = SHAPES_CAPTIONS[:4] + HAND_CAPTIONS
    expected = tokenize(tokenizer, captions)["input_ids"]
    tokenizer.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(tokenize(load_tokenizer(tmp_path / "saved"), captions)["input_ids"], expected)
    # The layout of a Stable Diffusion repository's tokenizer/ folder: vocab.json + merges.txt.
    vocab, merges = clip_vocab_and_merges()
    folder = tmp_path / "sd" / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    loaded = load_tokenizer(tmp_path / "sd", subfolder="tokenizer")
    assert len(loaded) == VOCAB_SIZE and loaded.model_max_length == CONTEXT_LENGTH
    torch.testing.assert_close(tokenize(loaded, captions)["input_ids"], expected)
    sd2 = load_tokenizer(folder, pad_token="!")
    assert sd2.pad_token_id == 0


# ---------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_text_encoder(text_encoder_config("tiny")).eval()


def test_encoder_output_shapes_and_empty_prompt(tokenizer, encoder):
    batch = tokenize(tokenizer, SHAPES_CAPTIONS[:3])
    for layer in ("last", "penultimate"):
        assert encode_text(encoder, batch["input_ids"], layer=layer).shape == (3, 77, 64)
    empty = empty_prompt_embedding(tokenizer, encoder)
    assert empty.shape == (1, 77, 64) and not empty.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(empty, encode_text(encoder, tokenize(tokenizer, "")["input_ids"]))
    assert empty.abs().mean() > 0.1  # the unconditional input is an encoding, not zeros
    assert empty_prompt_embedding(tokenizer, encoder, layer="penultimate").shape == (1, 77, 64)


def test_penultimate_is_sd2s_layer(tokenizer):
    """SD2 runs every block but the last, then the final LayerNorm: the same as an encoder whose
    last block was dropped (how SD2 checkpoints store it), read at its last layer."""
    torch.manual_seed(0)
    encoder = build_text_encoder(TextEncoderConfig(num_hidden_layers=3)).eval()
    ids = tokenize(tokenizer, SHAPES_CAPTIONS[:4])["input_ids"]
    shorter = build_text_encoder(TextEncoderConfig(num_hidden_layers=2)).eval()
    result = shorter.load_state_dict(encoder.state_dict(), strict=False)
    assert not result.missing_keys and all(".layers.2." in k for k in result.unexpected_keys)
    with torch.no_grad():
        last = encode_text(encoder, ids)
        penultimate = encode_text(encoder, ids, layer="penultimate")
        manual = encode_text(shorter, ids)
        hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(penultimate, manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(penultimate, encoder.final_layer_norm(hidden[2]))
    assert (penultimate - last).abs().max() > 0.1


def test_causal_encoder_ignores_padding_for_caption_positions(encoder):
    sd1, sd2 = load_tokenizer(), load_tokenizer(pad_token="!")
    caption = "a small red circle on a white background"
    batch = tokenize(sd1, caption)
    n = int(batch["attention_mask"].sum())
    with torch.no_grad():
        a = encode_text(encoder, batch["input_ids"])
        b = encode_text(encoder, tokenize(sd2, caption)["input_ids"])
        masked = encode_text(encoder, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(a[:, :n], b[:, :n], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[:, :n], masked[:, :n], rtol=0, atol=1e-6)
    assert (a[:, n:] - b[:, n:]).abs().max() > 1e-3  # the pad id is part of the conditioning


def test_save_and_from_pretrained_round_trip(tokenizer, encoder, tmp_path):
    ids = tokenize(tokenizer, SHAPES_CAPTIONS[:2])["input_ids"]
    encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = build_text_encoder(tmp_path, subfolder="text_encoder")
    with torch.no_grad():
        for layer in ("last", "penultimate"):
            torch.testing.assert_close(
                encode_text(loaded, ids, layer=layer), encode_text(encoder, ids, layer=layer), rtol=0, atol=0
            )
    half = build_text_encoder(tmp_path / "text_encoder", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_checkpoint_in_the_text_model_key_layout_loads(encoder, tmp_path):
    """SD checkpoints saved by transformers 4 name weights ``text_model.encoder.layers...``."""
    from safetensors.torch import save_file

    encoder.save_pretrained(tmp_path)
    state = {f"text_model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = build_text_encoder(tmp_path)
    ids = torch.tensor([[BOS_ID, 320, 1125, EOS_ID] + [EOS_ID] * 73])
    with torch.no_grad():
        torch.testing.assert_close(encode_text(loaded, ids), encode_text(encoder, ids), rtol=0, atol=0)


def test_parameter_counts_of_real_sizes():
    with torch.device("meta"):
        counts = {
            name: build_text_encoder(text_encoder_config(name)).num_parameters() for name in ("sd1", "sd2")
        }
    assert counts == {"sd1": 123_060_480, "sd2": 340_387_840}  # CLIP ViT-L/14, OpenCLIP ViT-H/14 (23 blocks)
    config = text_encoder_config("sd1").to_clip_text_config()
    assert isinstance(config, CLIPTextConfig) and config.eos_token_id == EOS_ID
    assert config.hidden_act == "quick_gelu" and text_encoder_config("sd2").hidden_act == "gelu"


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden_size": 66}, "num_attention_heads"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"vocab_size": 1000}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"max_position_embeddings": 1}, "max_position_embeddings"),
    ],
)
def test_bad_encoder_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextEncoderConfig(**kwargs)


def test_bad_inputs_raise(tokenizer, encoder):
    ids = tokenize(tokenizer, "a cat")["input_ids"]
    cases = [
        (lambda: text_encoder_config("huge"), "name"),
        (lambda: build_text_encoder(42), "config_or_path"),
        (lambda: build_text_encoder(text_encoder_config("tiny"), subfolder="x"), "subfolder"),
        (lambda: load_tokenizer(pad_token="<|nope|>"), "pad_token"),
        (lambda: load_tokenizer(model_max_length=1), "model_max_length"),
        (lambda: load_tokenizer(subfolder="tokenizer"), "subfolder"),
        (lambda: tokenize(tokenizer, []), "captions"),
        (lambda: tokenize(tokenizer, ["ok", None]), r"captions\[1\]"),
        (lambda: tokenize(tokenizer, "a cat", max_length=1), "max_length"),
        (lambda: encode_text(encoder, ids, layer="first"), "layer"),
        (lambda: encode_text(encoder, ids.float()), "input_ids"),
        (lambda: encode_text(encoder, ids[0]), "input_ids"),
        (lambda: encode_text(encoder, torch.cat([ids, ids[:, :1]], 1)), "max_position_embeddings"),
        (lambda: encode_text(encoder, ids + VOCAB_SIZE), "allowed"),
        (lambda: encode_text(encoder, ids, attention_mask=torch.ones(1, 5)), "attention_mask"),
        (
            lambda: encode_text(
                build_text_encoder(TextEncoderConfig(num_hidden_layers=1)), ids, layer="penultimate"
            ),
            "penultimate",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
