"""Models from checkpoints: a daqkd run or checkpoint (FP or quantized) or published weights, built,
quantized and loaded strictly, as a model that takes uint8 images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import check_format, damaged_metadata, read_checkpoint, resolve_checkpoint
from .errors import DaqkdError


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                           arch: str) -> None:
    """``model.load_state_dict(state)`` with one clear error line when they do not fit."""
    own = model.state_dict()
    # BatchNorm fills in num_batches_tracked, which checkpoints from before PyTorch 0.4.1 lack.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        fits = fitting_architectures(state)
        hint = f"--arch {' or '.join(fits)} fits them" if fits else "pass the --arch the weights were trained with"
        raise DaqkdError(f"checkpoint {path} does not fit --arch {arch}: keys {'; '.join(parts)}; {hint}")
    for key, value in own.items():
        if key in state and state[key].shape != value.shape:
            if value.ndim >= 1 and key == _head_key(own) and state[key].shape[1:] == value.shape[1:]:
                raise DaqkdError(
                    f"checkpoint {path} has {state[key].shape[0]} classes but the data has "
                    f"{value.shape[0]}: pass weights trained on this data set"
                )
            raise DaqkdError(
                f"checkpoint {path} does not fit --arch {arch}: {key} has shape "
                f"{tuple(state[key].shape)}, the model wants {tuple(value.shape)}"
            )
    for key, value in own.items():
        if value.is_floating_point() and key in state:
            if not state[key].is_floating_point():
                raise DaqkdError(f"checkpoint {path}: {key} holds {state[key].dtype} values where the model has "
                                 f"{value.dtype} weights: pass a float checkpoint")
            if not bool(torch.isfinite(state[key]).all()):
                raise DaqkdError(f"checkpoint {path}: {key} holds NaN or infinite values: the run that wrote it "
                                 "diverged; use an earlier checkpoint")
    model.load_state_dict(state)


def fitting_architectures(state: dict[str, torch.Tensor]) -> list[str]:
    """The 32x32 models (by name) whose state dict has exactly these keys and shapes, for error hints.

    Only the CIFAR registry is tried: its models are small enough to build on an error path.
    """
    from .models.registry import CIFAR_MODELS

    head = _head_key(state)
    if not head:
        return []
    num_classes = int(state[head].shape[0])
    fits = []
    for name, factory in CIFAR_MODELS.items():
        own = factory(num_classes).state_dict()
        keys = {k for k in own if not k.endswith("num_batches_tracked")}
        if keys <= state.keys() <= own.keys() and all(state[k].shape == own[k].shape for k in keys):
            fits.append(name)
    return fits


def _head_key(state: dict[str, torch.Tensor]) -> str:
    """The weight of the last layer (the classifier head) in a state dict."""
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return weights[-1] if weights else ""


def load_model(path: str | Path, *, arch: str | None = None, normalize: str | None = None,
               num_classes: int | None = None, fallback_arch: str | None = None,
               classes: list[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Any classifier checkpoint as a model that takes uint8 images (a NormalizedModel).

    ``path`` is a daqkd run directory or checkpoint (FP or quantized: architecture, normalization,
    classes and quantization come from its metadata; ``arch``/``normalize``, if given, must agree
    with them), or a published weights file without daqkd metadata (.th/.pt/.pth/.safetensors),
    which needs ``arch`` (else ``fallback_arch``) and ``normalize``. ``num_classes`` (the data's)
    sizes a foreign model's head and is checked against a daqkd checkpoint's.

    Returns (model, info): info holds ``arch``, ``normalize`` (the m,m,m:s,s,s spec),
    ``num_classes``, ``quant`` (a QuantConfig dict or None), ``classes`` (names or None: a daqkd
    checkpoint's names must equal ``classes``, the data's, in order),
    ``weights`` (the file read) and ``foreign`` (True without daqkd metadata), plus the rest of a
    daqkd checkpoint's metadata.
    """
    from .models import NAMED_NORMALIZATIONS, NormalizedModel, create_model, parse_normalization
    from .quant import QuantConfig, quantize_model

    file = resolve_checkpoint(path)
    state, meta = read_checkpoint(file)
    foreign = "arch" not in meta or "normalize" not in meta
    if foreign:
        arch = arch or fallback_arch
        if arch is None:
            raise DaqkdError(f"{file} does not say its architecture: pass --arch (e.g. resnet20, resnet56b)")
        if normalize is None:
            raise DaqkdError(
                f"{file} does not say how its inputs were normalized: pass --normalize with the statistics "
                f"it was trained with ({', '.join(NAMED_NORMALIZATIONS)} or m1,m2,m3:s1,s2,s3)"
            )
        if num_classes is None:
            raise DaqkdError(f"{file} does not say how many classes it has: pass --data with its data set")
        meta = {"arch": arch, "normalize": parse_normalization(normalize).spec(), "num_classes": num_classes,
                "quant": None, "classes": None}
    else:
        check_metadata(file, meta)
        if arch is not None and arch != meta["arch"]:
            raise DaqkdError(f"{file} is a {meta['arch']} checkpoint, not --arch {arch}: drop --arch "
                             "(daqkd checkpoints know their architecture)")
        stored = parse_normalization(meta["normalize"])
        if normalize is not None and parse_normalization(normalize) != stored:
            raise DaqkdError(f"{file} was trained with normalization {stored.spec()}, not --normalize {normalize}: "
                             "drop --normalize (daqkd checkpoints know their normalization)")
        meta = {"num_classes": len(meta.get("classes") or []) or None, "quant": None, "classes": None, **meta}
    stored_classes = meta.get("classes")
    if classes is not None and stored_classes and len(stored_classes) == len(classes):
        differ = [i for i, (a, b) in enumerate(zip(stored_classes, classes)) if a != b]
        if differ:
            i = differ[0]
            raise DaqkdError(
                f"{file} was trained on other classes than the data's: its class {i} is {stored_classes[i]!r}, "
                f"the data's {classes[i]!r} ({len(differ)} of {len(classes)} differ); pass the data set it was "
                "trained on (class names and their order must match)")
    count = num_classes if num_classes is not None else meta["num_classes"]
    if count is None:
        raise DaqkdError(f"{file} does not say how many classes it has: pass --data with its data set")
    model = create_model(meta["arch"], int(count))
    if meta["quant"]:
        quant = QuantConfig(**meta["quant"])  # keys checked by check_metadata
        try:
            quant.validate()
        except DaqkdError as exc:  # validate's lines name CLI flags, which this file's reader did not pass
            raise damaged_metadata(file, f"quant: {flag_as_field(str(exc))}") from exc
        except (TypeError, ValueError) as exc:  # a value no daqkd wrote (e.g. ewgs_delta "x")
            raise damaged_metadata(file, f"quant: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}") from exc
        quantize_model(model, quant)
    load_state_dict_strict(model, state, file, meta["arch"])
    norm = parse_normalization(meta["normalize"])
    info = {**meta, "normalize": norm.spec(), "weights": str(file), "foreign": foreign}
    return NormalizedModel(model, norm), info


def flag_as_field(message: str) -> str:
    """QuantConfig.validate's line about a CLI flag ("--w-bits must be ...") as one about the stored
    field ("w_bits must be ..."), for errors in a file's metadata."""
    return re.sub(r"^--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)


def check_metadata(file: Path, meta: dict[str, Any]) -> None:
    """One error line for daqkd metadata that would otherwise fail deep inside model building."""
    from dataclasses import fields

    from .quant import QuantConfig

    if not isinstance(meta.get("arch"), str) or not isinstance(meta.get("normalize"), str):
        raise damaged_metadata(file, "arch and normalize must be strings")
    count = meta.get("num_classes")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise damaged_metadata(file, f"num_classes is {count!r}, not a positive integer")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)):
        raise damaged_metadata(file, "classes must be a list of names")
    quant = meta.get("quant")
    if quant is not None:
        if not isinstance(quant, dict):
            raise damaged_metadata(file, f"quant is a {type(quant).__name__}, not an object")
        unknown = sorted(set(quant) - {f.name for f in fields(QuantConfig)})
        if unknown:
            raise DaqkdError(f"{file} has a quantization setting this daqkd does not know ({', '.join(unknown)}): "
                             "it was written by another version; use that version or retrain")
    check_format(file, meta.get("format", 1), quant)


def model_size_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of the weights at their bit widths (quantized layers' weights at w_bits, everything else
    at 32 bits) and at FP32."""
    from .quant import quantized_layers

    quant_bits = {id(m.weight): m.weight_quantizer.bits for m in quantized_layers(model).values()}
    fp_bits = low_bits = 0
    for p in model.parameters():
        fp_bits += 32 * p.numel()
        low_bits += quant_bits.get(id(p), 32) * p.numel()
    return {"bytes": low_bits / 8, "fp32_bytes": fp_bits / 8, "compression": fp_bits / max(low_bits, 1)}
