"""fla-compatible fused modules: `from flashlin.modules import RMSNorm` replaces
`from fla.modules import RMSNorm`. The compute is libflashlin's (CPU and CUDA, forward and
backward); see each file for the math."""
from .convolution import ShortConvolution, short_convolution
from .norm import FusedRMSNormGated, RMSNorm, rms_norm, rms_norm_gated
from .rotary import RotaryEmbedding, rotary_embedding
from .token_shift import token_shift

__all__ = ["RMSNorm", "FusedRMSNormGated", "rms_norm", "rms_norm_gated", "RotaryEmbedding",
           "rotary_embedding", "ShortConvolution", "short_convolution", "token_shift"]
