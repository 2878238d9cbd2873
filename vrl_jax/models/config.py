"""Model configuration read from a Hugging Face `config.json`.

Every size, epsilon, rotary theta and token id comes from the checkpoint's own config: released
checkpoints differ (tied embeddings, vocabulary sizes, eps) and hard-coding any of them is the
classic port bug. Both layouts transformers writes are accepted: the flat hub layout (text fields
at the top level, `rope_scaling.mrope_section`) and the nested 5.x layout (`text_config`,
`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from vrl_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")


class ConfigError(UserError, ValueError):
    """A config.json that vrl_jax cannot serve, with the file and field named."""


class MissingConfigError(UserError, FileNotFoundError):
    """A model directory without its config.json."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    # Qwen3 style decoders: explicit head_dim, no q/k/v bias, RMSNorm of q and k per head, and
    # interleaved M-RoPE sections. The defaults are Qwen2's.
    explicit_head_dim: int | None = None
    attention_bias: bool = True
    qk_norm: bool = False
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower; `variant` separates Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

    variant: str  # "qwen2_vl"/"qwen3_vl" (LayerNorm, fc1/fc2 MLP) or "qwen2_5_vl" (RMSNorm, SwiGLU, windows)
    depth: int
    width: int  # vision hidden width (Qwen2-VL: embed_dim; Qwen2.5-VL, Qwen3-VL: hidden_size)
    num_heads: int
    mlp_dim: int
    out_dim: int  # the language model width the merger projects to
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    rope_theta: float
    window_size: int | None  # pixels; None means no window attention (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...]
    tokens_per_second: float
    # Qwen3-VL: a biased patch embedding, a learned position table of this many entries (a square
    # grid, resampled to each image; 0 = none) and DeepStack mergers after these blocks.
    patch_bias: bool = False
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def norm_type(self) -> str:
        return "rmsnorm" if self.variant == "qwen2_5_vl" else "layernorm"

    @property
    def mlp_type(self) -> str:
        """"fc" (fc1 -> act -> fc2) or "swiglu" (Qwen2.5-VL's gate/up/down)."""
        return "swiglu" if self.variant == "qwen2_5_vl" else "fc"

    @property
    def patch_embed_hf_shape(self) -> tuple[int, ...]:
        """The HF Conv3d weight shape [width, C, T, P, P]."""
        return (self.width, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size)

    def is_full_attention(self, layer: int) -> bool:
        return self.window_size is None or layer in self.fullatt_block_indexes


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig  # or llava_config.LlavaVisionConfig for llava_onevision
    tie_word_embeddings: bool
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    raw: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Reads `path/config.json` (or `path` itself if it is a file)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise MissingConfigError(f"{file}: no config.json (expected a Hugging Face model directory)")
        try:
            with open(file) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a JSON object, got a {type(raw).__name__}")
        return cls.from_dict(raw, source=file)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<config>") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
                "(vrl_jax implements Qwen2-VL, Qwen2.5-VL, dense Qwen3-VL and LLaVA-OneVision)")
        text_raw = dict(raw.get("text_config") or {})
        # Flat hub configs keep the text fields at the top level; nested ones win where both exist.
        text = _text_config({**{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")},
                             **text_raw}, source, model_type)
        vision, special = _family_parser(model_type)(raw, text.hidden_size, source)
        tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
        if model_type in _TIE_FROM_TEXT:  # LlavaOnevisionConfig: a tied text config ties the whole model
            tie = tie or text_raw.get("tie_word_embeddings", False)
        eos = raw.get("eos_token_id", text_raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        pad = raw.get("pad_token_id", text_raw.get("pad_token_id"))
        return cls(
            model_type=model_type, text=text, vision=vision, tie_word_embeddings=bool(tie),
            **special, eos_token_ids=eos_ids, pad_token_id=None if pad is None else int(pad), raw=raw)


# model_type -> "module:function" parsing the family's vision config and special token ids:
# fn(raw config, LM width, source) -> (vision config, dict of the four *_token_id fields).
FAMILY_PARSERS = {
    "qwen2_vl": "vrl_jax.models.config:_qwen_family",
    "qwen2_5_vl": "vrl_jax.models.config:_qwen_family",
    "qwen3_vl": "vrl_jax.models.config:_qwen_family",
    "llava_onevision": "vrl_jax.models.llava_config:parse_llava_family",
}
_TIE_FROM_TEXT = ("llava_onevision",)


def _family_parser(model_type: str):
    import importlib
    module, name = FAMILY_PARSERS[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def _qwen_family(raw: dict, lm_width: int, source: str) -> tuple["VisionConfig", dict]:
    vision = VISION_READERS[raw["model_type"]](raw.get("vision_config") or {}, raw["model_type"], lm_width, source)
    return vision, dict(image_token_id=int(_req(raw, "image_token_id", source, 151655)),
                        video_token_id=int(_req(raw, "video_token_id", source, 151656)),
                        vision_start_token_id=int(_req(raw, "vision_start_token_id", source, 151652)),
                        vision_end_token_id=int(_req(raw, "vision_end_token_id", source, 151653)))


def _req(raw: dict, key: str, source: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{source}: missing field {key!r}")
    return value


def _int(raw: dict, key: str, source: str, default: Any = None) -> int:
    value = _req(raw, key, source, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class DecoderStyle:
    """What a model type's decoder does differently (see TextConfig)."""

    qwen3: bool  # explicit head_dim, no q/k/v bias, q/k RMSNorm, interleaved M-RoPE
    default_section: tuple[int, ...] = ()  # mrope_section when the config names none (() = 1-D rotary)


DECODER_STYLES = {"qwen2_vl": DecoderStyle(False), "qwen2_5_vl": DecoderStyle(False),
                  "qwen3_vl": DecoderStyle(True, (24, 20, 20)), "llava_onevision": DecoderStyle(False)}


def _text_config(raw: dict, source: str, model_type: str = "qwen2_vl") -> TextConfig:
    style = DECODER_STYLES[model_type]
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
    if raw.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported (released Qwen2-VL configs set false)")
    hidden = _int(raw, "hidden_size", source)
    heads = _int(raw, "num_attention_heads", source)
    kv_heads = _int(raw, "num_key_value_heads", source, heads)
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"{source}: hidden_size {hidden} must divide by num_attention_heads {heads}, "
                          f"which must divide by num_key_value_heads {kv_heads}")
    head_dim = _int(raw, "head_dim", source, 128) if style.qwen3 else hidden // heads
    if style.qwen3 and raw.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for {model_type} "
                          "(released configs set false)")
    section = tuple(int(s) for s in rope.get("mrope_section", style.default_section))
    if not section:
        section = (head_dim // 2, 0, 0)  # plain 1-D rotary: every frequency from the temporal axis
    if min(section) < 0 or sum(section) != head_dim // 2:
        raise ConfigError(f"{source}: mrope_section {list(section)} must be non-negative and sum to head_dim/2 = {head_dim // 2}")
    return TextConfig(
        vocab_size=_int(raw, "vocab_size", source), hidden_size=hidden,
        intermediate_size=_int(raw, "intermediate_size", source), num_layers=_int(raw, "num_hidden_layers", source),
        num_heads=heads, num_kv_heads=kv_heads, rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), mrope_section=section,
        **(dict(explicit_head_dim=head_dim, attention_bias=False, qk_norm=True, mrope_interleaved=True)
           if style.qwen3 else {}))


def _vision_config(raw: dict, model_type: str, lm_width: int, source: str) -> VisionConfig:
    src = f"{source} (vision_config)"
    rope = raw.get("rope_parameters") or {}
    if model_type == "qwen2_vl":
        # Naming trap: in Qwen2-VL `embed_dim` is the vision width and `hidden_size` the LM width.
        width = _int(raw, "embed_dim", src, 1280)
        mlp_dim = int(width * raw.get("mlp_ratio", 4))
        out_dim = _int(raw, "hidden_size", src, lm_width)
        act, window, fullatt, tps = raw.get("hidden_act", "quick_gelu"), None, (), 2.0
    else:
        width = _int(raw, "hidden_size", src, 1280)
        mlp_dim = _int(raw, "intermediate_size", src, 3420)
        out_dim = _int(raw, "out_hidden_size", src, lm_width)
        act = raw.get("hidden_act", "silu")
        window = _int(raw, "window_size", src, 112)
        fullatt = tuple(int(i) for i in raw.get("fullatt_block_indexes", (7, 15, 23, 31)))
        tps = float(raw.get("tokens_per_second", 4))
    if out_dim != lm_width:
        raise ConfigError(f"{src}: the merger output width {out_dim} must equal text hidden_size {lm_width}")
    heads = _int(raw, "num_heads", src, 16)
    if width % heads:
        raise ConfigError(f"{src}: vision width {width} must divide by num_heads {heads}")
    patch, merge = _int(raw, "patch_size", src, 14), _int(raw, "spatial_merge_size", src, 2)
    if window is not None and window % (patch * merge):
        raise ConfigError(f"{src}: window_size {window} must be a multiple of patch_size*spatial_merge_size "
                          f"= {patch * merge}")
    return VisionConfig(
        variant=model_type, depth=_int(raw, "depth", src, 32), width=width, num_heads=heads, mlp_dim=mlp_dim,
        out_dim=out_dim, hidden_act=act, patch_size=patch,
        temporal_patch_size=_int(raw, "temporal_patch_size", src, 2), merge_size=merge,
        in_channels=_int(raw, "in_channels", src, 3), rope_theta=float(rope.get("rope_theta", 10000.0)),
        window_size=window, fullatt_block_indexes=fullatt, tokens_per_second=tps)


def _qwen3_vision_config(raw: dict, model_type: str, lm_width: int, source: str) -> VisionConfig:
    """Qwen3-VL's vision_config: transformers' class defaults where a field is absent."""
    src = f"{source} (vision_config)"
    width, heads = _int(raw, "hidden_size", src, 1152), _int(raw, "num_heads", src, 16)
    depth = _int(raw, "depth", src, 27)
    out_dim = _int(raw, "out_hidden_size", src, 3584)
    if out_dim != lm_width:
        raise ConfigError(f"{src}: the merger output width {out_dim} must equal text hidden_size {lm_width}")
    if width % heads:
        raise ConfigError(f"{src}: vision width {width} must divide by num_heads {heads}")
    positions = _int(raw, "num_position_embeddings", src, 2304)
    if int(positions**0.5) ** 2 != positions:
        raise ConfigError(f"{src}: num_position_embeddings {positions} must be a square (a side x side grid)")
    deepstack = tuple(int(i) for i in raw.get("deepstack_visual_indexes", (8, 16, 24)))
    if any(not 0 <= i < depth for i in deepstack) or len(set(deepstack)) != len(deepstack):
        raise ConfigError(f"{src}: deepstack_visual_indexes {list(deepstack)} must be distinct block indexes "
                          f"below depth {depth}")
    rope = raw.get("rope_parameters") or {}
    return VisionConfig(
        variant="qwen3_vl", depth=depth, width=width, num_heads=heads,
        mlp_dim=_int(raw, "intermediate_size", src, 4304), out_dim=out_dim,
        hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh"), patch_size=_int(raw, "patch_size", src, 16),
        temporal_patch_size=_int(raw, "temporal_patch_size", src, 2),
        merge_size=_int(raw, "spatial_merge_size", src, 2), in_channels=_int(raw, "in_channels", src, 3),
        rope_theta=float(rope.get("rope_theta", 10000.0)), window_size=None, fullatt_block_indexes=(),
        tokens_per_second=2.0, patch_bias=True, num_position_embeddings=positions,
        deepstack_visual_indexes=deepstack)


# model_type -> reader of its vision_config: (raw vision_config, model_type, LM width, source) -> VisionConfig.
VISION_READERS = {"qwen2_vl": _vision_config, "qwen2_5_vl": _vision_config, "qwen3_vl": _qwen3_vision_config}
