"""LMConfig: the configuration of flashlin's decoder-only language model (JSON-serialisable)."""
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

MIXERS = ("retention", "gla", "rwkv6", "lightning", "gateloop", "based", "abc", "gsa", "vq")


def check_mixer(mixer):
    """Raise ValueError with a clear message unless `mixer` is one flashlin can build."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; available: {', '.join(MIXERS)}")
    return mixer


@dataclass
class LMConfig:
    """A stack of blocks x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x)).

    mixer: 'retention' (MultiScaleRetention), 'gla' (GatedLinearAttention), 'rwkv6'
    (RWKV6Attention), 'lightning' (LightningAttention), 'gateloop' (GateLoopAttention), 'based'
    (BasedLinearAttention), 'abc' (ABCAttention), 'gsa' (GatedSlotAttention) or 'vq'
    (VQAttention). Settings a mixer's layer does not have (e.g. use_short_conv for Based and VQ)
    are not passed to it. expand_k / expand_v None: the layer's
    own default. mlp_ratio: fla's hidden_ratio (SwiGLU width = mlp_ratio * hidden * 2/3, rounded
    up to a multiple of mlp_multiple_of) unless intermediate_size is given. mixer_kwargs: any
    further constructor arguments of the mixer (e.g. {'gate_low_rank_dim': 8})."""
    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mixer: str = "gla"
    mlp_ratio: float = 4.0
    intermediate_size: Optional[int] = None
    mlp_multiple_of: int = 32
    tie_word_embeddings: bool = True
    norm_eps: float = 1e-5
    expand_k: Optional[float] = None
    expand_v: Optional[float] = None
    use_short_conv: bool = False
    conv_size: int = 4
    mixer_kwargs: dict = field(default_factory=dict)
    initializer_range: float = 0.02

    def __post_init__(self):
        check_mixer(self.mixer)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name}: expected a positive int, got {value!r}")

    @property
    def mlp_size(self):
        if self.intermediate_size is not None:
            return int(self.intermediate_size)
        size = int(self.hidden_size * self.mlp_ratio * 2 / 3)
        m = max(1, int(self.mlp_multiple_of))
        return m * ((size + m - 1) // m)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type", "flashlin_version"})
        if unknown:
            raise ValueError(f"LMConfig: unknown keys {unknown}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self):
        return json.dumps(dict(self.to_dict(), model_type="flashlin-lm"), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))
