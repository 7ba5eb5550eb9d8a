r"""CLIP text conditioning: the tokenizer, the text encoder and the empty-prompt embedding for CFG.

Stable Diffusion conditions its UNet on the per-token output of CLIP's text transformer (Radford et
al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", arXiv 2103.00020;
Rombach et al. 2022, arXiv 2112.10752, §3.3): a caption becomes 77 token ids, and the encoder turns
them into a ``(77, D)`` matrix :math:`\tau_\theta(y)` that cross-attention reads as keys and values.

Tokenizer. CLIP uses byte-level byte-pair encoding (Sennrich et al. 2016, arXiv 1508.07909) with
49,408 ids: 256 byte symbols, the same 256 as word ends (``"</w>"``), 48,894 merges and the two
markers ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407). The merges ship inside the
open-clip-torch wheel as ``bpe_simple_vocab_16e6.txt.gz``; :func:`load_tokenizer` rebuilds the
exact CLIP vocabulary from that file, offline, as a transformers ``CLIPTokenizer``. A caption is
cleaned as CLIP cleans it (:func:`clean_caption`), lower-cased, split into words, punctuation runs
and single digits, and each piece is merged into sub-words. Every sequence is

.. math:: [\text{start}, w_1, \dots, w_n, \text{end}, \text{pad}, \dots, \text{pad}],\quad
          \text{length } 77,\ n \le 75,

and a caption longer than 75 sub-words is cut (with a :class:`CaptionTruncatedWarning` that says
what was lost: words past the 75th never reach the model).

Text encoder. A transformers ``CLIPTextModel`` (pre-norm transformer with a causal mask, Vaswani et
al. 2017, arXiv 1706.03762): built from a small config for the course, or loaded with
``from_pretrained`` for real checkpoints. :func:`encode_text` returns the last layer (SD1) or the
penultimate one (SD2), :func:`empty_prompt_embedding` the unconditional input of classifier-free
guidance (Ho & Salimans 2022, arXiv 2207.12598).
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import importlib.util
import os
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .._checks import check_choice, check_number

CONTEXT_LENGTH = 77  # CLIP's sequence length: start + 75 sub-words + end
VOCAB_SIZE = 49408  # 256 bytes + 256 word-final bytes + 48,894 merges + 2 markers
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
# What fills the positions after the end token. The encoder is causal, so padding never changes the
# caption's own outputs, but SD feeds all 77 outputs to cross-attention: the pad id is part of what
# a model was trained on. SD1 (transformers' CLIPTokenizer) pads with the end token, id 49407;
# SD2 (open_clip.tokenize) pads with id 0, the token "!".
SD1_PAD_TOKEN = EOS_TOKEN
SD2_PAD_TOKEN = "!"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
LAYERS = ("last", "penultimate")


class CaptionTruncatedWarning(UserWarning):
    """A caption had more sub-words than fit between the start and end tokens; the rest was cut."""


# ----------------------------------------------------------------------------------------------
# The vocabulary, rebuilt from the BPE merges that open-clip-torch ships


def bpe_vocab_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open-clip-torch package.

    Found with ``importlib.util.find_spec``, which locates the package without importing it:
    ``import open_clip`` needs torchvision, which the course does not install.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "open_clip (package open-clip-torch) is not installed; it ships CLIP's BPE vocabulary. "
            "Install it without its dependencies: pip install --no-deps open-clip-torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters.

    The 188 bytes that are already visible characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the other 68 (space, control bytes...) map to ``chr(256)``, ``chr(257)``, ... in
    order. BPE then works on strings of these characters, so no byte is ever unknown. The order of
    the returned dict (visible bytes first) is the order of ids 0..255 in the vocabulary.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    table = {b: chr(b) for b in visible}
    table.update({b: chr(256 + i) for i, b in enumerate(hidden)})
    return table


@lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # Line 0 is a version header; CLIP keeps the next 48,894 merges (49152 - 256 - 2 of them).
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} does not hold {NUM_MERGES} BPE merges of two symbols each")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return tuple(tokens), merges


def clip_vocab_and_merges(
    bpe_path: str | os.PathLike | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and its ranked merges, rebuilt as CLIP builds them.

    Ids 0..255 are the byte symbols of :func:`bytes_to_unicode`, 256..511 the same symbols ending a
    word (``"</w>"``), 512..49405 the result of each merge in rank order, 49406 and 49407 the start
    and end markers. ``bpe_path`` defaults to the file open-clip-torch ships (:func:`bpe_vocab_path`).
    """
    tokens, merges = _read_vocab(str(bpe_path if bpe_path is not None else bpe_vocab_path()))
    return {t: i for i, t in enumerate(tokens)}, list(merges)


def load_tokenizer(
    path: str | os.PathLike | None = None,
    *,
    model_max_length: int = CONTEXT_LENGTH,
    pad_token: str | None = None,
    **from_pretrained_kwargs,
) -> CLIPTokenizer:
    """The CLIP tokenizer as a transformers ``CLIPTokenizer`` (Radford et al. 2021, arXiv 2103.00020).

    - ``path=None``: built offline from the BPE file of open-clip-torch (:func:`clip_vocab_and_merges`);
      the ids are CLIP's. ``pad_token`` defaults to :data:`SD1_PAD_TOKEN` (the end token, id 49407).
    - ``path`` a folder (or, with network, a hub id) holding a saved tokenizer, e.g. the
      ``tokenizer`` folder of a Stable Diffusion checkpoint: ``CLIPTokenizer.from_pretrained``, with
      ``from_pretrained_kwargs`` passed on (``subfolder="tokenizer"`` for a whole SD repository).
      ``pad_token`` defaults to what the folder says (SD2's says ``"!"``, id 0).

    ``pad_token`` must be a token of the vocabulary; use :data:`SD2_PAD_TOKEN` to pad as SD2 does.
    """
    check_number("model_max_length", model_max_length, low=2, integer=True)
    if pad_token is not None and not isinstance(pad_token, str):
        raise ValueError(
            f"pad_token={pad_token!r} must be a token string: {SD1_PAD_TOKEN!r}, {SD2_PAD_TOKEN!r}..."
        )
    if path is None:
        if from_pretrained_kwargs:
            raise ValueError(f"{sorted(from_pretrained_kwargs)} only apply when loading from a path")
        vocab, merges = clip_vocab_and_merges()
        pad = SD1_PAD_TOKEN if pad_token is None else pad_token
        if pad not in vocab:
            raise ValueError(
                f"pad_token={pad!r} is not in CLIP's vocabulary; e.g. {SD1_PAD_TOKEN!r}, {SD2_PAD_TOKEN!r}"
            )
        return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, pad_token=pad)
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path={path!r} must be None (CLIP's vocabulary) or a tokenizer folder")
    tokenizer = CLIPTokenizer.from_pretrained(
        path, model_max_length=model_max_length, **from_pretrained_kwargs
    )
    if pad_token is not None:
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token={pad_token!r} is not in the vocabulary of the tokenizer at {path}")
        tokenizer.pad_token = pad_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Caption -> 77 ids

# CLIP runs every caption through ftfy.fix_text before tokenizing. These are the repairs of its
# defaults that change ordinary captions; ftfy's mojibake repair (text decoded with the wrong
# codec) is not reproduced, so ftfy stays out of the dependencies.
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")  # ʼ ‘ ’ ‚ ‛ -> '
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")  # “ ” „ ‟ -> "
_LIGATURES = str.maketrans(
    {"ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st", "Ĳ": "IJ", "ĳ": "ij"}
    | {"ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj"}
    | {"ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj"}
)
# Full-width and half-width forms (ＡＢＣ, ｶﾀｶﾅ) and the ideographic space -> their usual forms.
_WIDTH = str.maketrans(
    {chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)} | {"\u3000": " "}
)
# C1 control characters are almost always Windows-1252 punctuation read as Latin-1: \x93 is “.
_C1_CONTROLS = re.compile("[\x80-\x9f]")
# Control and format characters that carry no text (keeps tab, newlines and joiners).
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")


def _c1_to_cp1252(match: re.Match) -> str:
    try:
        return match.group().encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d have no Windows-1252 character
        return match.group()


def clean_caption(text: str) -> str:
    """Clean a caption as CLIP does before BPE: HTML entities, typography, whitespace.

    CLIP (Radford et al. 2021) applies ``ftfy.fix_text``, unescapes HTML twice and collapses
    whitespace. Here: ``&amp;`` -> ``&``; C1 controls read as Windows-1252; Latin ligatures split
    (``ﬁ`` -> ``fi``); full-width forms narrowed; curly quotes straightened (so ``it’s`` tokenizes as
    ``it's``); invisible control characters dropped; NFC normalisation; runs of whitespace -> one
    space; lower case.
    """
    text = html.unescape(html.unescape(text))
    text = _C1_CONTROLS.sub(_c1_to_cp1252, text)
    text = text.translate(_LIGATURES).translate(_WIDTH)
    text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
    text = _INVISIBLE.sub("", text)
    # Lower-case here, not in the tokenizer: Python's str.lower, as CLIP's, knows the word-final
    # sigma (ΟΔΟΣ -> οδος); the tokenizer's own NFC and lower-casing then change nothing.
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def tokenize(
    tokenizer: CLIPTokenizer, captions: str | Sequence[str], max_length: int = CONTEXT_LENGTH
) -> dict[str, torch.Tensor]:
    r"""Captions -> ``input_ids`` and ``attention_mask``, both ``(B, max_length)`` int64.

    Each row is :math:`[\text{start}, w_1..w_n, \text{end}, \text{pad}...]`: the caption is cleaned
    (:func:`clean_caption`), split into CLIP sub-words :math:`w_i`, cut to
    :math:`n \le \text{max\_length} - 2` and padded with ``tokenizer.pad_token_id``. The mask is 1 on
    start, sub-words and end, 0 on padding (SD1 and SD2 never pass it to the encoder; see
    :func:`encode_text`). A cut caption emits a :class:`CaptionTruncatedWarning` naming the
    caption and the text that was dropped.
    """
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, Sequence) or len(captions) == 0:
        raise ValueError(f"captions={captions!r} must be a string or a non-empty list of strings")
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"captions[{i}]={caption!r} must be a string (use '' for no caption)")
    check_number("max_length", max_length, low=2, integer=True)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (see load_tokenizer)")

    cleaned = [clean_caption(c) for c in captions]
    # No truncation here: we cut ourselves, to say what was cut. Offsets locate it in the caption.
    encoded = tokenizer(cleaned, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    input_ids = torch.full((len(captions), max_length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(captions), max_length), dtype=torch.long)
    room = max_length - 2  # sub-words that fit between start and end
    for i, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)):
        if len(ids) > room:
            cut = cleaned[i][offsets[room][0] :]
            warnings.warn(
                f"caption {i} has {len(ids)} sub-word tokens but only {room} fit in max_length="
                f"{max_length}; cut: {cut!r} (caption: {captions[i]!r})",
                CaptionTruncatedWarning,
                stacklevel=2,
            )
            ids = ids[:room]
        row = [bos, *ids, eos]
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------
# The text encoder


@dataclass(frozen=True)
class TextEncoderConfig:
    """Size of a CLIP text transformer (Radford et al. 2021, §2.4; GPT-2-style pre-norm blocks)."""

    hidden_size: int = 64  # width D of every token embedding; the UNet's cross-attention context dim
    num_hidden_layers: int = 2  # transformer blocks
    num_attention_heads: int = 4  # heads per block; must divide hidden_size
    intermediate_size: int = 256  # MLP width, 4 * hidden_size in CLIP
    max_position_embeddings: int = CONTEXT_LENGTH  # learned positions: the longest token sequence
    vocab_size: int = VOCAB_SIZE  # token embeddings; at least CLIP's 49,408 ids
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI CLIP, SD1), "gelu" (OpenCLIP, SD2)
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("max_position_embeddings", self.max_position_embeddings, low=2, integer=True)
        check_number("vocab_size", self.vocab_size, low=VOCAB_SIZE, integer=True)
        check_choice("hidden_act", self.hidden_act, ("quick_gelu", "gelu"))
        check_number("layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )

    def to_clip_text_config(self) -> CLIPTextConfig:
        """The equivalent transformers ``CLIPTextConfig`` (end token 49407 marks the pooled output)."""
        return CLIPTextConfig(
            **dataclasses.asdict(self), bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID
        )


TEXT_ENCODER_CONFIGS: dict[str, TextEncoderConfig] = {
    # Course encoders: the token table (49,408 x D) holds most of their weights.
    "tiny": TextEncoderConfig(64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "small": TextEncoderConfig(128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
    # SD1: OpenAI CLIP ViT-L/14's text tower.
    "sd1": TextEncoderConfig(768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    # SD2: OpenCLIP ViT-H/14's text tower as SD2 checkpoints store it, with 23 of its 24 blocks:
    # SD2 reads the penultimate layer, so the last block was dropped and "last" here is SD2's input.
    "sd2": TextEncoderConfig(1024, 23, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu"),
}


def text_encoder_config(name: str) -> TextEncoderConfig:
    """A named encoder size: ``"tiny"``, ``"small"`` (course), ``"sd1"``, ``"sd2"`` (Stable Diffusion)."""
    check_choice("name", name, TEXT_ENCODER_CONFIGS)
    return TEXT_ENCODER_CONFIGS[name]


def build_text_encoder(
    config_or_path: TextEncoderConfig | CLIPTextConfig | str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    **from_pretrained_kwargs,
) -> CLIPTextModel:
    """A transformers ``CLIPTextModel`` (Radford et al. 2021, arXiv 2103.00020).

    - a :class:`TextEncoderConfig` or ``CLIPTextConfig``: a freshly initialised model of that size;
    - a folder (or, with network, a hub id): ``CLIPTextModel.from_pretrained``, e.g. the
      ``text_encoder`` folder of a Stable Diffusion checkpoint (``subfolder="text_encoder"`` for the
      whole repository). Extra keyword arguments go to ``from_pretrained``.

    Loads on the CPU; ``dtype`` (e.g. ``torch.float16`` for a frozen encoder) casts the weights.
    """
    if isinstance(config_or_path, TextEncoderConfig):
        config_or_path = config_or_path.to_clip_text_config()
    if isinstance(config_or_path, CLIPTextConfig):
        if from_pretrained_kwargs:
            raise ValueError(f"{sorted(from_pretrained_kwargs)} only apply when loading from a path")
        model = CLIPTextModel(config_or_path)
    elif isinstance(config_or_path, (str, os.PathLike)):
        model = CLIPTextModel.from_pretrained(config_or_path, **from_pretrained_kwargs)
    else:
        raise ValueError(
            f"config_or_path={config_or_path!r} must be a TextEncoderConfig, a CLIPTextConfig or a path"
        )
    if dtype is not None:
        model = model.to(dtype)
    return model


def _final_layer_norm(text_encoder: CLIPTextModel) -> torch.nn.LayerNorm:
    # transformers 5 keeps the layers on the model itself; 4.x under ``.text_model``.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_text(
    text_encoder: CLIPTextModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layer: str = "last",
) -> torch.Tensor:
    r"""Token ids ``(B, L)`` -> per-token embeddings ``(B, L, D)``, the context of cross-attention.

    With :math:`h_0` the token plus position embeddings and :math:`h_k` the output of block
    :math:`k` of :math:`N`:

    - ``"last"`` (SD1; Rombach et al. 2022): :math:`\mathrm{LN}_{final}(h_N)`;
    - ``"penultimate"`` (SD2): :math:`\mathrm{LN}_{final}(h_{N-1})`. SD2's ``FrozenOpenCLIPEmbedder``
      runs OpenCLIP's blocks but the last, then applies the final LayerNorm ``ln_final``; that is
      what this computes. (SDXL also reads :math:`h_{N-1}`, but without the final LayerNorm.)
      SD2 checkpoints in diffusers/transformers format already dropped their last block: use
      ``"last"`` with them, ``"penultimate"`` with a full 24-block OpenCLIP ViT-H.

    ``attention_mask`` (1 = token, 0 = padding) is passed to the encoder when given; SD1 and SD2
    pass none (only the causal mask), so pad positions attend to the caption and carry signal.
    Gradients flow; wrap in ``torch.no_grad()`` for a frozen encoder.
    """
    check_choice("layer", layer, LAYERS)
    config = text_encoder.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor of shape (B, L), got {input_ids!r}")
    if input_ids.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has length {input_ids.shape[1]}; allowed: at most max_position_embeddings="
            f"{config.max_position_embeddings}"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        low, high = int(input_ids.min()), int(input_ids.max())
        raise ValueError(f"input_ids range over [{low}, {high}]; allowed: [0, {config.vocab_size})")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        raise ValueError(f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}")
    if layer == "penultimate" and config.num_hidden_layers < 2:
        raise ValueError(
            f"layer='penultimate' needs 2 blocks or more; the encoder has {config.num_hidden_layers}"
        )

    device = text_encoder.device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None
    if layer == "last":
        return text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    out = text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    # hidden_states = (h_0, h_1, ..., h_N): [-2] is the output of block N-1, before any final norm.
    return _final_layer_norm(text_encoder)(out.hidden_states[-2])


@torch.no_grad()
def empty_prompt_embedding(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    *,
    layer: str = "last",
    max_length: int = CONTEXT_LENGTH,
) -> torch.Tensor:
    r"""The encoding of the empty caption ``""``, shape ``(1, max_length, D)``: CFG's unconditional input.

    Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) mixes :math:`\hat\varepsilon =
    \varepsilon(x_t, \varnothing) + w\,(\varepsilon(x_t, c) - \varepsilon(x_t, \varnothing))`.
    In Stable Diffusion :math:`\varnothing` is not a zero tensor: it is the encoder's output for the
    ids ``[start, end, pad, ...]``, the same input that caption dropout feeds during training. It is
    fixed for a frozen encoder, so compute it once and ``expand`` it to the batch.
    """
    ids = tokenize(tokenizer, "", max_length=max_length)["input_ids"]
    return encode_text(text_encoder, ids, layer=layer)
