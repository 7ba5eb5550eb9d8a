"""Reading, checking and loading state dicts: what the diffusers and single-file loaders share.

Two rules hold for every checkpoint this package reads:

- **No code runs while loading.** ``.safetensors`` files hold only tensors. ``.ckpt``/``.bin``/``.pt``
  files are pickles, and a pickle can name any Python callable to run on load; they are read with
  ``torch.load(weights_only=True)``, which accepts tensors, numbers, strings and containers only, and
  a file with anything else is refused (:class:`CheckpointError`), never unpickled.
- **No silent partial loads.** A checkpoint must provide every parameter of the model, no others,
  each with the right shape; otherwise :class:`KeyMismatchError` lists the missing, unexpected and
  misshapen keys (the first few of each, and how many there are).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
MAX_LISTED = 10  # keys listed per category in a mismatch error; the counts are always complete


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or that is not what the caller asked to load."""


class KeyMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not match the model. The full lists are attributes:
    ``missing`` and ``unexpected`` (key names), ``mismatched`` (key, checkpoint shape, model shape)."""

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


# ----------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict stored in ``path``, without running any code from it.

    ``.safetensors`` is read with safetensors. Pickle formats (``.ckpt``, ``.bin``, ``.pt``, ``.pth``)
    are read with ``torch.load(weights_only=True)``; a Lightning checkpoint's weights nested under
    ``"state_dict"`` are unwrapped, its other entries (``global_step``, ...) dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    if path.suffix not in PICKLE_SUFFIXES:
        allowed = ", ".join((".safetensors", *PICKLE_SUFFIXES))
        raise CheckpointError(
            f"checkpoint {str(path)!r}: unknown file type {path.suffix!r}; allowed: {allowed}"
        )
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {str(path)!r}: it contains pickled Python objects other than tensors, and "
            "unpickling them could run arbitrary code (torch.load(weights_only=True) stopped at: "
            f"{_first_line(err)}). If you trust its source, convert it once to .safetensors in an isolated "
            "environment and load that."
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of tensors "
            "(nor a dict with one under 'state_dict')"
        )
    return dict(obj)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported" in line or "GLOBAL" in line]
    return (unsupported or lines or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------- checking


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f", ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(shown) + more


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    source: str,
    *,
    shape_ok: Callable[[str, tuple[int, ...], tuple[int, ...]], bool] | None = None,
    hint: str = "",
) -> None:
    """Raise :class:`KeyMismatchError` unless ``got`` has exactly the keys of ``expected``, each with
    the expected shape (or one that ``shape_ok(key, got_shape, expected_shape)`` accepts).

    ``source`` names the checkpoint in the message; ``hint`` is appended to it (e.g. which config
    option usually explains the mismatch).
    """
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = []
    for key, shape in expected.items():
        if key in got:
            have = tuple(got[key].shape)
            if have != tuple(shape) and not (shape_ok and shape_ok(key, have, tuple(shape))):
                mismatched.append((key, have, tuple(shape)))
    if not (missing or unexpected or mismatched):
        return
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} with the wrong shape"
    message = f"{source} does not match the model ({counts}; nothing was loaded)"
    if missing:
        message += _listing("missing", missing)
    if unexpected:
        message += _listing("unexpected", unexpected)
    if mismatched:
        message += _listing("wrong shape", [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched])
    if hint:
        message += f"\n  {hint}"
    raise KeyMismatchError(message, missing, unexpected, mismatched)


# ----------------------------------------------------------------------------------------- loading


def _cast(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype`` (integer buffers keep theirs), everything to ``device``."""
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in state_dict.items()
    }


def build_and_load(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    hint: str = "",
) -> nn.Module:
    """``factory()`` with the weights of ``state_dict``, strictly: every key checked first.

    The model is built on the ``meta`` device (no memory, no random initialisation: an SD-sized UNet
    would spend seconds drawing weights that are overwritten at once) and the checkpoint's tensors,
    cast to ``dtype`` (default float32, whatever the file stores), become its parameters. A model with
    non-persistent buffers, which a state dict cannot fill, is built normally instead.
    """
    dtype = torch.float32 if dtype is None else dtype
    with torch.device("meta"):
        model = factory()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(expected, state_dict, source, hint=hint)
    tensors = _cast(state_dict, dtype, device)
    every = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if every - set(expected):  # non-persistent buffers: only a real construction fills them
        with torch.device(device):
            model = factory()
        model.to(dtype).load_state_dict(tensors, strict=True)
    else:
        model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as detached, contiguous CPU tensors, ready to serialise (no copies of
    what is already contiguous on the CPU: an SD UNet is 3.4 GB in fp32)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` to ``path`` as safetensors, with ``{"format": "pt"}`` metadata as the
    Hugging Face libraries write it."""
    from safetensors.torch import save_file

    save_file(dict(state_dict), str(path), metadata={"format": "pt", **(metadata or {})})
