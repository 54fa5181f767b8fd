"""Frozen differentiable reward models and SRPO's Semantic Relative Preference (SRPO_SPEC.md section 4)."""
from rewards.base import RewardCheckpointError, RewardModel
from rewards.loader import REWARD_KINDS, load_reward_model
from rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from rewards.srp import (
    CONTROL_NEGATIVE,
    CONTROL_POSITIVE,
    SRP_FORMS,
    SRPResult,
    control_prompt,
    control_words,
    semantic_relative_preference,
    srp_score,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CONTROL_NEGATIVE",
    "CONTROL_POSITIVE",
    "REWARD_KINDS",
    "SRP_FORMS",
    "RewardCheckpointError",
    "RewardModel",
    "SRPResult",
    "clip_preprocess",
    "control_prompt",
    "control_words",
    "load_reward_model",
    "semantic_relative_preference",
    "srp_score",
]
