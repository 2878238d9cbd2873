"""LLaVA-OneVision's vision side, read from its `config.json` (no JAX here: config parsing stays light).

A LLaVA-OneVision config nests a SigLIP `vision_config` and a Qwen2 `text_config`; the top level holds
the projector, the AnyRes grid pinpoints and `vision_aspect_ratio` ("anyres_max_9": how many tiles'
worth of features an image may keep before its features are downsampled). Defaults are
transformers' own (`LlavaOnevisionConfig.sub_configs_defaults`, `SiglipVisionConfig`), because
released configs omit fields equal to them.
"""

from __future__ import annotations

import dataclasses
import re

# transformers' LlavaOnevisionConfig fills an absent vision_config with these (SigLIP so400m, last layer dropped).
SIGLIP_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384, num_hidden_layers=26,
                       num_attention_heads=16)
# LlavaOnevisionConfig's default image_grid_pinpoints: every (a, b) x 384 for a, b in 1..6.
DEFAULT_PINPOINTS = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))


@dataclasses.dataclass(frozen=True)
class LlavaVisionConfig:
    """The SigLIP tower, the two-layer projector and the AnyRes layout of LLaVA-OneVision."""

    width: int  # SigLIP hidden size
    depth: int  # SigLIP layers run: those up to `vision_feature_layer`
    num_layers: int  # SigLIP layers stored in the checkpoint
    num_heads: int
    mlp_dim: int
    image_size: int  # one tile's side in pixels (384)
    patch_size: int
    in_channels: int
    eps: float
    hidden_act: str
    out_dim: int  # the language model width the projector maps to
    projector_act: str
    projector_bias: bool
    grid_pinpoints: tuple[tuple[int, int], ...]  # (height, width) in pixels
    max_num_patches: int  # the N of "anyres_max_N"
    merge_size: int = 1  # no patch merging: one projected unit per SigLIP patch (shared rollout code reads it)
    window_size: None = None  # no window attention

    @property
    def grid(self) -> int:
        """Patches per tile side (27 for 384 / 14)."""
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Patches (and projected features) per tile: grid^2 (729)."""
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def patch_embed_hf_shape(self) -> tuple[int, ...]:
        """The HF Conv2d weight shape [width, C, P, P]."""
        return (self.width, self.in_channels, self.patch_size, self.patch_size)


def _pos_int(raw: dict, key: str, source: str, default=None) -> int:
    from vrl_jax.models.config import ConfigError
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    return value


def parse_llava_family(raw: dict, lm_width: int, source: str) -> tuple[LlavaVisionConfig, dict]:
    """The vision config and the special token ids of a `llava_onevision` config.json.

    Returns (LlavaVisionConfig, dict of image_token_id, video_token_id, vision_start_token_id,
    vision_end_token_id (-1: LLaVA has no vision start/end tokens)). Raises ConfigError naming the field.
    """
    from vrl_jax.models.config import ConfigError
    src = f"{source} (vision_config)"
    v = {**SIGLIP_DEFAULTS, **(raw.get("vision_config") or {})}
    width, heads = _pos_int(v, "hidden_size", src), _pos_int(v, "num_attention_heads", src)
    if width % heads:
        raise ConfigError(f"{src}: hidden_size {width} must divide by num_attention_heads {heads}")
    image_size, patch = _pos_int(v, "image_size", src), _pos_int(v, "patch_size", src)
    if image_size % patch:
        raise ConfigError(f"{src}: image_size {image_size} must be a multiple of patch_size {patch}")
    num_layers = _pos_int(v, "num_hidden_layers", src)
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -num_layers - 1 <= layer <= num_layers:
        raise ConfigError(f"{source}: vision_feature_layer must be one integer in [{-num_layers - 1}, {num_layers}] "
                          f"(a list of layers is not supported), got {layer!r}")
    depth = layer % (num_layers + 1)  # hidden_states[k] is the output of k layers (0: the embeddings)
    strategy = raw.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ConfigError(f"{source}: vision_feature_select_strategy {strategy!r} is not supported; expected "
                          f"'full' (SigLIP has no CLS token to drop)")
    aspect = raw.get("vision_aspect_ratio", "anyres_max_9")
    m = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"{source}: vision_aspect_ratio must be 'anyres_max_N' with N > 0, got {aspect!r}")
    pinpoints = raw.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    try:
        pinpoints = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: image_grid_pinpoints must be a list of [height, width] pairs, "
                          f"got {raw.get('image_grid_pinpoints')!r}") from None
    bad = [p for p in pinpoints if p[0] <= 0 or p[1] <= 0 or p[0] % image_size or p[1] % image_size]
    if bad:
        raise ConfigError(f"{source}: image_grid_pinpoints {list(map(list, bad))} are not positive multiples of "
                          f"the tile size vision_config.image_size = {image_size}")
    vision = LlavaVisionConfig(
        width=width, depth=depth, num_layers=num_layers, num_heads=heads,
        mlp_dim=_pos_int(v, "intermediate_size", src), image_size=image_size, patch_size=patch,
        in_channels=_pos_int(v, "num_channels", src, 3), eps=float(v.get("layer_norm_eps", 1e-6)),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"), out_dim=lm_width,
        projector_act=raw.get("projector_hidden_act", "gelu"),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)), grid_pinpoints=pinpoints,
        max_num_patches=int(m.group(1)))
    # transformers 5.x reads image_token_index; image_token_id is its attribute alias.
    special = dict(image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 151646))),
                   video_token_id=int(raw.get("video_token_index", raw.get("video_token_id", 151647))),
                   vision_start_token_id=-1, vision_end_token_id=-1)
    return vision, special
