"""Data augmentation: batched per-image policies, the base crop + flip, CutMix, the registry."""

from .registry import PAPER_CANDIDATES, Candidate, cutmix, known_names, parse_candidates

__all__ = ["PAPER_CANDIDATES", "Candidate", "cutmix", "known_names", "parse_candidates"]
