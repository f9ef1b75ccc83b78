"""A decoder-only language model over flashlin's layers.

    embeddings -> N x [x + mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> lm_head

Parameter names follow fla's models (embeddings, layers.i.attn_norm / attn / mlp_norm /
mlp.{gate,up,down}_proj, norm, lm_head), without fla's "model." prefix (`convert_fla_state_dict`
strips it).
"""
import inspect
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import (ABCAttention, BasedLinearAttention, Cache, GatedLinearAttention,
                      GatedSlotAttention, GateLoopAttention, LightningAttention,
                      MultiScaleRetention, RWKV6Attention, VQAttention)
from .config import LMConfig

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"


MIXER_CLASSES = {"retention": MultiScaleRetention, "gla": GatedLinearAttention,
                 "rwkv6": RWKV6Attention, "lightning": LightningAttention,
                 "gateloop": GateLoopAttention, "based": BasedLinearAttention,
                 "abc": ABCAttention, "gsa": GatedSlotAttention, "vq": VQAttention}


def build_mixer(config, layer_idx):
    """The mixer layer of block `layer_idx` for `config`: the config's settings that the layer's
    constructor takes, then config.mixer_kwargs (passed as given)."""
    cls = MIXER_CLASSES[config.mixer]
    settings = dict(hidden_size=config.hidden_size, num_heads=config.num_heads,
                    norm_eps=config.norm_eps, layer_idx=layer_idx,
                    use_short_conv=config.use_short_conv, conv_size=config.conv_size,
                    num_layers=config.num_layers,  # lightning: decays; rwkv6: initialisation
                    num_key_value_heads=config.num_heads)  # Based: one value head per head
    for name in ("expand_k", "expand_v"):
        if getattr(config, name) is not None:
            settings[name] = getattr(config, name)
    accepted = inspect.signature(cls.__init__).parameters
    common = {k: v for k, v in settings.items() if k in accepted}
    common.update(config.mixer_kwargs)
    return cls(**common)


class GatedMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) (fla.modules.GatedMLP's names)."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        from ..modules import RMSNorm
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = build_mixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_size)

    def forward(self, x, attention_mask=None, cache=None, use_cache=False, cu_seqlens=None):
        h, _, cache = self.attn(self.attn_norm(x), attention_mask=attention_mask,
                                past_key_values=cache, use_cache=use_cache, cu_seqlens=cu_seqlens)
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return x, cache


class LanguageModel(nn.Module):
    """forward(input_ids [B, T], attention_mask=None, cache=None, use_cache=False,
    cu_seqlens=None) -> logits [B, T, vocab] (float32), or (logits, cache) when use_cache."""

    def __init__(self, config):
        super().__init__()
        from ..modules import RMSNorm
        if isinstance(config, dict):
            config = LMConfig.from_dict(config)
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight

    def reset_parameters(self):
        std = self.config.initializer_range
        for module in self.modules():
            if getattr(module, "_flashlin_initialized", False):
                continue  # RWKV-6 initialises its own projections
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        # GPT-2's scaling of the projections that write into the residual stream.
        scale = 1.0 / math.sqrt(2 * self.config.num_layers)
        with torch.no_grad():
            for block in self.layers:
                block.mlp.down_proj.weight.mul_(scale)
                block.attn.o_proj.weight.mul_(scale)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self):
        return self.embeddings.weight.device

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False,
                cu_seqlens=None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seq_len], got shape "
                             f"{list(input_ids.shape)}")
        if use_cache and cache is None:
            cache = Cache()
        x = self.embeddings(input_ids)
        for block in self.layers:
            x, cache = block(x, attention_mask, cache, use_cache, cu_seqlens)
        logits = self.lm_head(self.norm(x)).float()
        return (logits, cache) if use_cache else logits

    # --- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 attention_mask=None, eos_token_id=None, generator=None):
        """Continue each prompt by `max_new_tokens` tokens: one forward over the prompts (the
        prefill, chunked kernels for prompts longer than 64 tokens), then one token at a time
        from the layers' caches. temperature 0: greedy; > 0: sampling, optionally restricted to
        the top_k tokens and/or the smallest set of probability >= top_p. attention_mask
        [B, T]: left-padded prompts (0 = padding). After eos_token_id a row keeps emitting
        eos_token_id. Returns [B, T + max_new_tokens] token ids (prompts included)."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError("attention_mask: expected the shape of input_ids "
                                 f"{list(input_ids.shape)}, got {list(attention_mask.shape)}")
            if not bool(attention_mask[:, -1].bool().all()):
                raise ValueError("attention_mask: prompts must be left-padded (the last column "
                                 "must be all ones)")
        was_training = self.training
        self.eval()
        try:
            logits, cache = self(input_ids, attention_mask=attention_mask, use_cache=True)
            tokens = [input_ids]
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for i in range(max_new_tokens):
                token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = token.masked_fill(finished, eos_token_id)
                    finished |= token == eos_token_id
                tokens.append(token[:, None])
                if i + 1 == max_new_tokens:
                    break
                if attention_mask is not None:
                    attention_mask = F.pad(attention_mask, (0, 1), value=1)
                logits, cache = self(token[:, None], attention_mask=attention_mask, cache=cache,
                                     use_cache=True)
            return torch.cat(tokens, dim=1)
        finally:
            self.train(was_training)

    # --- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, path, safe_serialization=None):
        """Write config.json and the weights (model.safetensors when safetensors is importable
        and safe_serialization is not False, else pytorch_model.bin) into directory `path`."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            f.write(self.config.to_json() + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as embeddings.weight
        save_file = None
        if safe_serialization is not False:
            try:
                from safetensors.torch import save_file
            except ImportError:
                if safe_serialization:
                    raise
        for name in (SAFETENSORS_NAME, TORCH_NAME):  # never leave a stale copy of the other
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        if save_file is not None:
            save_file(state, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
            return os.path.join(path, SAFETENSORS_NAME)
        torch.save(state, os.path.join(path, TORCH_NAME))
        return os.path.join(path, TORCH_NAME)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu"):
        """Load a model written by save_pretrained."""
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = LMConfig.from_dict(json.load(f))
        model = cls(config)
        state = load_weights(path, map_location)
        result = model.load_state_dict(convert_fla_state_dict(state), strict=False)
        missing = set(result.missing_keys)
        if config.tie_word_embeddings:
            missing.discard("lm_head.weight")  # tied to embeddings.weight
        if missing or result.unexpected_keys:
            raise RuntimeError(f"from_pretrained: missing weights {sorted(missing)}, unexpected "
                               f"{sorted(result.unexpected_keys)}")
        return model.to(map_location) if map_location is not None else model


def load_weights(path, map_location="cpu"):
    """The state dict stored in checkpoint directory `path`."""
    safetensors_file = os.path.join(path, SAFETENSORS_NAME)
    if os.path.exists(safetensors_file):
        from safetensors.torch import load_file
        device = str(map_location) if map_location is not None else "cpu"
        return load_file(safetensors_file, device=device)
    torch_file = os.path.join(path, TORCH_NAME)
    if not os.path.exists(torch_file):
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {TORCH_NAME} in {path}")
    return torch.load(torch_file, map_location=map_location)


def convert_fla_state_dict(state):
    """fla's causal-LM keys ("model.layers.0...", "lm_head.weight") to these ("layers.0...")."""
    return {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}


def sample_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids [B] from logits [B, V]: argmax when temperature <= 0, else sampled from
    softmax(logits / temperature) restricted to top_k and nucleus top_p."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
