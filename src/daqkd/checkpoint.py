"""Reading and writing model weights safely.

Reads ``.th/.pt/.pth`` files with ``torch.load(weights_only=True)`` (never arbitrary unpickling;
nested ``state_dict``/``model`` entries and DataParallel's ``module.`` prefixes are handled) and
``.safetensors`` files. The project's own checkpoints are safetensors whose metadata holds a JSON
``daqkd`` entry (arch, classes, normalization, ...), written atomically. Reading and writing only:
building models from checkpoints is :mod:`daqkd.loading`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import DaqkdError
from .rundir import atomic_path

METADATA_KEY = "daqkd"
# Bumped when the same weights and metadata would give another model. 1 (no "format" entry): before
# 2026-11-29. 2: EWGS activations beside 32-bit weights (W32/A-k) return l + (u - l) q, not q.
FORMAT_VERSION = 2


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with bare keys, daqkd metadata or {}) from a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise DaqkdError(f"checkpoint {path} does not exist: pass an existing run directory or weights file")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError) as exc:
            raise DaqkdError(f"cannot read {path} as safetensors ({exc}): is the file complete?") from exc
        if not raw:
            return state, {}
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise damaged_metadata(path, f"not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise damaged_metadata(path, f"a {type(meta).__name__}, not an object")
        return state, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DaqkdError(
            f"cannot read {path} as a weights-only PyTorch checkpoint ({first[:120]}): it is damaged, not a "
            "PyTorch file, or holds pickled Python objects, which daqkd never unpickles (they could run code); if "
            "you trust its source, re-save it as a plain state dict (torch.save(model.state_dict(), path)) or as "
            ".safetensors"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DaqkdError(f"{path} holds no state dict of tensors: pass a model's weights")
    return {k.removeprefix("module."): v for k, v in obj.items()}, {}


def save_checkpoint(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state dict and metadata (with the ``format`` version) as safetensors, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps({**metadata, "format": FORMAT_VERSION})})
        except (SafetensorError, RuntimeError) as exc:  # safetensors reports a full disk as its own error
            raise write_failed(path, exc) from exc


CHECKPOINT_REMEDY = "use another checkpoint of the run (last.safetensors) or retrain it"
RESUME_STATE_REMEDY = "start a new run directory"


def damaged_metadata(path: str | Path, what: str, remedy: str = CHECKPOINT_REMEDY) -> DaqkdError:
    """The one error line for a daqkd file whose metadata cannot be what daqkd wrote."""
    return DaqkdError(f"{path} has damaged daqkd metadata ({what}): {remedy}")


def check_format(path: str | Path, version: Any, quant: dict[str, Any] | None,
                 remedy: str = CHECKPOINT_REMEDY) -> None:
    """One error line for a checkpoint or resume state (format ``version``, quantization ``quant`` as
    a QuantConfig dict or None) that this daqkd would load as another model than it was trained as;
    ``remedy`` ends the line for a damaged format entry."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise damaged_metadata(path, f"format is {version!r}, not a positive integer", remedy)
    if version > FORMAT_VERSION:
        raise DaqkdError(f"{path} was written by a newer daqkd (format {version}; this one reads up to "
                         f"{FORMAT_VERSION}): upgrade daqkd")
    if version < 2 and quant and quant.get("method") == "ewgs" and quant.get("w_bits") == 32:
        # the weights would load, and the model would compute something else than it was trained as
        raise DaqkdError(f"{path} holds a W32/A{quant.get('a_bits')} EWGS model from before 2026-11-29, when these "
                         "activations returned codes in [0, 1] instead of l + (u - l) q: retrain it with this "
                         "daqkd, or use the daqkd it was trained with")


def write_failed(path: str | Path, exc: BaseException) -> DaqkdError:
    """One line for a write that failed (full disk, file too large, read-only): what and what to do."""
    cause = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return DaqkdError(f"could not write {path} ({cause}): the files written before stay valid; free space or fix "
                      "the file system, then rerun (training runs: --resume)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its best checkpoint (model.safetensors); a file is itself."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.safetensors"
        if not candidate.is_file():
            raise DaqkdError(f"{path} holds no model.safetensors: pass a finished run directory or a checkpoint file")
        return candidate
    return path
