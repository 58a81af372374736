"""attnreuse: faster diffusion sampling by reusing attention maps across denoising steps.

Implements Hunter, Dudziak et al., "Fast Sampling Through The Reuse Of Attention Maps In Diffusion Models"
(arXiv 2401.01008) for diffusers pipelines and models.
"""

from .reuse import (
                    AttentionReuseConfig,
                    AttentionReuseHandle,
                    AttentionReuseHelper,
                    apply_attention_reuse,
                    attention_layers,
)
from .schedule import Schedule, as_schedule

__version__ = "0.1.0"

__all__ = ["Schedule", "as_schedule", "AttentionReuseConfig", "AttentionReuseHandle", "AttentionReuseHelper",
           "apply_attention_reuse", "attention_layers", "__version__"]
