"""Knowledge-distillation losses by name (``--kd``), and the training task that runs them.

Every loss takes the student's logits, the teacher's logits (or None), the targets ((B,) class
indices or (B, K) label distributions, as CutMix makes) and a dict of intermediate features, and
returns a dict of named terms whose ``"loss"`` entry is optimized. A loss that needs features names
the modules in ``feature_layers(student)``; :class:`DistillTask` hooks them in the student and the
teacher and hands their outputs over as ``{"student": {name: tensor}, "teacher": {...}}``. A new
loss is one file in this package with a ``@register_loss(name)`` class (the package imports every
module in it), e.g. :mod:`.attention` and :mod:`.similarity`.

- ``none``: gamma * CE(student, targets)
- ``kd``: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015):
  gamma * CE(student, targets) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))
- ``sqakd``: Zhao & Zhao, "SQAKD: Self-supervised Quantization-Aware Knowledge Distillation"
  (AISTATS 2024): T^2 * KL(softmax(t / T) || softmax(s / T)), no labels.
Defaults follow the paper's CIFAR scripts: gamma = 1, alpha = 2, T = 4.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DaqkdError


@dataclass
class DistillConfig:
    gamma: float = 1.0  # weight of the cross-entropy with the labels
    alpha: float = 2.0  # weight of the distillation term
    temperature: float = 4.0
    label_smoothing: float = 0.0  # on the CE term (teacher training)
    beta: float | None = None  # weight of a feature term (None: the loss's own default)
    layers: tuple[str, ...] = ()  # modules whose outputs a feature loss compares (): its default


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE with hard (B,) or soft (B, K) targets, mean over the batch; ``label_smoothing`` ε mixes
    either with the uniform distribution: (1 - ε) * targets + ε / K."""
    if targets.ndim == 2:
        targets = targets.float()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T))."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


class DistillLoss(nn.Module):
    """Base class: ``needs_teacher`` tells the task whether to run the teacher;
    ``feature_layers(model)`` which modules' outputs it needs (none for logit losses)."""

    needs_teacher = True
    uses_features = False  # feature losses: their layers must resolve in both models
    name = ""

    def __init__(self, config: DistillConfig) -> None:
        super().__init__()
        self.config = config

    def feature_layers(self, model: nn.Module) -> tuple[str, ...]:
        return ()


class LabelsOnly(DistillLoss):
    needs_teacher = False

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        return {"loss": self.config.gamma * ce, "ce": ce}


class HintonKD(DistillLoss):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert teacher is not None
        ce = cross_entropy(student, targets, self.config.label_smoothing)
        kd = kl_divergence(student, teacher, self.config.temperature)
        return {"loss": self.config.gamma * ce + self.config.alpha * kd, "ce": ce, "kd": kd}


class SQAKD(DistillLoss):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, targets: torch.Tensor,
                features: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        assert teacher is not None
        kd = kl_divergence(student, teacher, self.config.temperature)
        return {"loss": kd, "kd": kd}


LOSSES: dict[str, Callable[[DistillConfig], DistillLoss]] = {}


def register_loss(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Class decorator: make the loss selectable as ``--kd name``."""

    def register(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.name = name
        LOSSES[name] = cls
        return cls

    return register


register_loss("none")(LabelsOnly)
register_loss("kd")(HintonKD)
register_loss("sqakd")(SQAKD)


def create_loss(name: str, config: DistillConfig | None = None) -> DistillLoss:
    if name not in LOSSES:
        raise DaqkdError(f"unknown --kd {name!r}: use one of {', '.join(LOSSES)}")
    return LOSSES[name](config or DistillConfig())


def feature_pairs(features: dict[str, dict[str, torch.Tensor]], loss: str, same_size: bool):
    """(layer name, student output, teacher output) for each hooked layer; with ``same_size``, one
    DaqkdError when their spatial sizes differ."""
    for name, student in features["student"].items():
        teacher = features["teacher"][name]
        if same_size and student.shape[2:] != teacher.shape[2:]:
            raise DaqkdError(f"--kd {loss}: {name} is {tuple(student.shape[2:])} in the student but "
                             f"{tuple(teacher.shape[2:])} in the teacher: pass --kd-layers with layers of equal size")
        yield name, student, teacher


def stage_outputs(model: nn.Module) -> tuple[str, ...]:
    """The residual stages of a ResNet-like model (``layer1``, ``layer2``, ...), the usual places
    for feature distillation; () for other models (then pass the layers explicitly)."""
    return tuple(name for name, _ in model.named_children() if name.startswith("layer") and name[5:].isdigit())


class DistillTask:
    """One training step's forward: the teacher (if the loss needs it, without gradients), the
    student, their features at the loss's layers, and the loss terms.

    ``student``/``teacher`` take uint8 images (NormalizedModel); ``forward_student`` is what the
    step calls (the student itself, or its DDP wrapper). Layer names are module names inside the
    wrapped models (``layer1``, ``layer2.0.conv1``, ...).
    """

    def __init__(self, loss: DistillLoss, student: nn.Module, teacher: nn.Module | None,
                 forward_student: nn.Module | None = None) -> None:
        self.loss, self.student, self.teacher = loss, student, teacher
        self.forward_student = forward_student or student
        inner = getattr(student, "model", student)
        self.layers = tuple(loss.feature_layers(inner))
        if loss.uses_features and not self.layers:
            raise DaqkdError(f"--kd {loss.name} compares module outputs, and {type(inner).__name__} has no residual "
                             "stages (layer1, layer2, ...) to default to: pass --kd-layers with module names")
        self.captured: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.handles = []
        for role, model in (("student", student), ("teacher", teacher)):
            if model is None or not self.layers:
                continue
            inner = getattr(model, "model", model)
            for name in self.layers:
                try:
                    module = inner.get_submodule(name)
                except AttributeError as exc:
                    raise DaqkdError(f"--kd {type(loss).__name__}: the {role} has no module {name!r}: "
                                     "pass --kd-layers with module names of both models") from exc
                self.handles.append(module.register_forward_hook(self._capture(role, name)))

    def _capture(self, role: str, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.captured[role][name] = output

        return hook

    def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = None
        if self.teacher is not None and self.loss.needs_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        logits = self.forward_student(x)
        features = {role: dict(found) for role, found in self.captured.items()}
        for found in self.captured.values():
            found.clear()
        return self.loss(logits, teacher_logits, targets, features)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


for _module in pkgutil.iter_modules(__path__):  # each loss file registers itself
    importlib.import_module(f"{__name__}.{_module.name}")
