"""daqkd: Data-Augmented Quantization-Aware Knowledge Distillation (Kur & Zhao, arXiv 2509.03850).

The Python API (typed options, one function per command; see :mod:`daqkd.api`)::

    import daqkd
    report = daqkd.rank_augmentations(daqkd.RankOptions(data=..., weights=..., arch=..., normalize=...))
"""

__version__ = "0.1.0"

import logging

# torch.compile's C++ toolchain probe logs "No CUDA runtime is found, using CUDA_HOME=..." on every
# CPU-only run that compiles a kernel: noise for a CPU user, so only its errors are shown.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from .api import (
    EvalOptions,
    ExportOptions,
    RankOptions,
    StudentOptions,
    SweepOptions,
    TeacherOptions,
    evaluate,
    export_model,
    rank_augmentations,
    run_sweep,
    train_student,
    train_teacher,
)

__all__ = [
    "EvalOptions",
    "ExportOptions",
    "RankOptions",
    "StudentOptions",
    "SweepOptions",
    "TeacherOptions",
    "__version__",
    "evaluate",
    "export_model",
    "rank_augmentations",
    "run_sweep",
    "train_student",
    "train_teacher",
]
