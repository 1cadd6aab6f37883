"""daqkd: Data-Augmented Quantization-Aware Knowledge Distillation (Kur & Zhao, arXiv 2509.03850).

The Python API (typed options, one function per command; see :mod:`daqkd.api`)::

    import daqkd
    report = daqkd.rank_augmentations(daqkd.RankOptions(data=..., weights=..., arch=..., normalize=...))
"""

__version__ = "0.1.0"

from .api import (
    EvalOptions,
    RankOptions,
    StudentOptions,
    SweepOptions,
    TeacherOptions,
    evaluate,
    rank_augmentations,
    run_sweep,
    train_student,
    train_teacher,
)

__all__ = [
    "EvalOptions",
    "RankOptions",
    "StudentOptions",
    "SweepOptions",
    "TeacherOptions",
    "__version__",
    "evaluate",
    "rank_augmentations",
    "run_sweep",
    "train_student",
    "train_teacher",
]
