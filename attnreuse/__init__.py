"""attnreuse: faster diffusion sampling by reusing work across denoising steps, attention maps first.

Implements Hunter, Dudziak et al., "Fast Sampling Through The Reuse Of Attention Maps In Diffusion Models"
(arXiv 2401.01008) for diffusers pipelines and models, and plans that reuse work at every granularity.
"""

from .handle import AttentionReuseHandle
from .layers import attention_layers, denoiser
from .options import AttentionReuseConfig
from .plan import Plan, Schedule, Unit, as_plan, as_schedule
from .reuse import AttentionReuseHelper, apply_attention_reuse, apply_reuse

__version__ = "0.1.0"

__all__ = ["Plan", "Unit", "as_plan", "apply_reuse", "AttentionReuseHandle", "AttentionReuseConfig",
           "attention_layers", "denoiser", "Schedule", "as_schedule", "apply_attention_reuse", "AttentionReuseHelper",
           "__version__"]
