"""Data augmentation: batched per-image policies, the base crop + flip, batch mixers, the registry."""

from .base import POLICIES, register_policy
from .registry import MIXERS, PAPER_CANDIDATES, Candidate, check_candidate, cutmix, known_names, mixup, parse_candidates

__all__ = ["MIXERS", "PAPER_CANDIDATES", "POLICIES", "Candidate", "check_candidate", "cutmix", "known_names",
           "mixup", "parse_candidates", "register_policy"]
