"""attnreuse: faster diffusion sampling by reusing work across denoising steps, attention maps first.

Implements Hunter, Dudziak et al., "Fast Sampling Through The Reuse Of Attention Maps In Diffusion Models"
(arXiv 2401.01008) for diffusers pipelines and models, and plans that reuse work at every granularity.
"""

from .plan import Plan, Unit
from .reuse import (
    AttentionReuseConfig,
    AttentionReuseHandle,
    AttentionReuseHelper,
    apply_attention_reuse,
    apply_reuse,
    attention_layers,
)
from .schedule import Schedule, as_schedule

__version__ = "0.1.0"

__all__ = ["Plan", "Unit", "Schedule", "as_schedule", "AttentionReuseConfig", "AttentionReuseHandle",
           "AttentionReuseHelper", "apply_reuse", "apply_attention_reuse", "attention_layers", "__version__"]
