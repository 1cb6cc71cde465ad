"""moefx's graph passes and FFN pattern rules (installed as ``moefx.passes``)."""

from .ffn_pass import FindFFNPass, RewriteFFNPass, rewrite_with_layers
from .ffn_rules import FFN_RULES, LINEAR_FORMS, FailedMatch, FFNMatch, FFNRule, LinearSite, find_linear_sites
from .infra import PassManager, PassResult

__all__ = [
    "FFN_RULES",
    "LINEAR_FORMS",
    "FFNMatch",
    "FFNRule",
    "FailedMatch",
    "FindFFNPass",
    "LinearSite",
    "PassManager",
    "PassResult",
    "RewriteFFNPass",
    "find_linear_sites",
    "rewrite_with_layers",
]
