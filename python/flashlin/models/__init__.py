"""flashlin's decoder-only language model: `LMConfig`, `LanguageModel` (forward, generate,
save_pretrained / from_pretrained). See modeling.py."""
from .config import MIXERS, LMConfig, check_mixer
from .modeling import (Block, GatedMLP, LanguageModel, build_mixer, convert_fla_state_dict,
                       load_weights, sample_next_token)

__all__ = ["LMConfig", "LanguageModel", "Block", "GatedMLP", "MIXERS",
           "check_mixer", "build_mixer", "convert_fla_state_dict", "load_weights",
           "sample_next_token"]
