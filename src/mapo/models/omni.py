"""Adapters of the Qwen Omni thinkers: Qwen2.5-Omni and Qwen3-Omni-MoE (the paper's model), DESIGN §10.

A Hub folder of either holds the whole Omni model: config.json of model_type `qwen2_5_omni` /
`qwen3_omni_moe` with `thinker_config`, `talker_config`, … and weights keyed `thinker.*`, `talker.*`,
`token2wav.*` / `code2wav.*`. mapo needs the thinker (audio tower + text decoder) only: the loader
builds `Qwen2_5OmniThinkerForConditionalGeneration` / `Qwen3OmniMoeThinkerForConditionalGeneration`
from `thinker_config`, and transformers' checkpoint conversion for these classes strips the `thinker.`
prefix (and fuses Qwen3's per-expert weights into `experts.gate_up_proj` / `experts.down_proj`); the
talker's and the vocoder's tensors match no parameter, so they are never materialised. A thinker-only
folder (what `save_pretrained` of a thinker writes: model_type `*_thinker`, keys without the prefix)
loads the same way.

What differs from Qwen2-Audio, and where it is handled:
- Audio encoding: the towers take the *unpadded* frames of all clips concatenated with their lengths
  (`get_audio_features`), run attention in windows, and include the projection to the text width (no
  separate projector). `encode_audio` calls the model's own `get_audio_features` and splits per clip.
- Placeholder counts: Qwen2.5-Omni's tower yields ((L - 1) // 2 + 1 - 2) // 2 + 1 positions for L frames
  (as Qwen2-Audio, 25 per second); Qwen3-Omni's works on 100-frame chunks (13 positions each, 13 per
  second) plus the remainder (`num_audio_tokens`, the processors' own formulas).
- Features: Qwen2.5-Omni's processor pads each clip to the feature extractor's window (as Qwen2-Audio);
  Qwen3-Omni's neither pads to the window nor truncates (`clip_feature_kwargs`).
- Rotary positions: the thinkers use 3-D multimodal rotary positions, but for audio + text their own
  `get_rope_index` gives every token the plain sequential position on all three axes (audio is 1-D
  there; only images/videos get grid positions), so the 2-D `cumsum(mask) - 1` positions mapo passes
  are exactly the model's (the text models broadcast 2-D positions to 3 axes; tested against the
  model's own forward and `generate`).
- Parts: `model.model.audio_tower`, `model.model.language_model` (decoder layers), `model.lm_head`, and
  a vision tower `model.model.visual` that mapo never runs: its parameters are fixed (never trained) and
  it is its own FSDP unit, so it is never gathered. transformers before 5.2x (e.g. 5.17, measured on a
  GPU machine) keeps the towers and `get_audio_features` on the thinker itself and `model.model` is the
  text model; `_multimodal` finds whichever layout the installed version builds.
- Qwen3-Omni's decoder layers hold the experts as two fused 3-D parameters per layer
  (`mlp.experts.gate_up_proj` [E, 2·I, H], `mlp.experts.down_proj` [E, H, I]) and the router `mlp.gate`.
  FSDP2 wraps per decoder layer: one unit holds a layer's attention, router and all its experts, and
  `fully_shard` shards each expert tensor along its first (expert) dimension across ranks; the layer's
  experts are gathered together for its forward. There is no expert parallelism.
- The attention modules (`Qwen2_5OmniAttention`, `Qwen3OmniMoeThinkerTextAttention`) look their
  attention function up in their modeling module's `ALL_ATTENTION_FUNCTIONS` by
  `self.config._attn_implementation`, as `mapo.capture` expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapo.models.adapter import ModelAdapter, register_adapter
from mapo.models.omni_processor import load_omni_processor


def qwen25_omni_audio_tokens(n_frames: int) -> int:
    """Qwen2.5-Omni: positions for `n_frames` valid mel frames (conv stride 2, then average-pool 2)."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


def qwen3_omni_audio_tokens(n_frames: int, n_window: int = 50) -> int:
    """Qwen3-Omni: positions for `n_frames` valid mel frames.

    The tower cuts the frames into chunks of 2·n_window (100) frames, each through three stride-2
    convolutions: a full chunk gives 13 positions, the remainder r gives three halvings (rounded up) of r.
    E.g. 100 frames → 13, 300 → 39, 250 → 13·2 + 7 = 33. (transformers hard-codes the 13, so the
    released n_window = 50 is the only one its tower supports.)
    """
    chunk = 2 * n_window
    rest = n_frames % chunk
    for _ in range(3):
        rest = (rest - 1) // 2 + 1
    return rest + (n_frames // chunk) * 13


#: Mel frames of one full window of the released processors (Whisper feature extractor, 30 s at 100 frames
#: per second). The Omni towers take any length; the memory plan sizes one clip by this window.
RELEASED_WINDOW_FRAMES = 3000


class OmniThinkerAdapter(ModelAdapter):
    """What the two Omni thinkers share (`model.model.{audio_tower, visual, language_model}`, `model.lm_head`)."""

    #: transformers class names (resolved lazily so importing mapo does not import every model).
    thinker_class: str = ""
    processor_class: str = ""
    #: The Omni audio towers take clips of any length (nothing is cut).
    audio_window_fixed = False

    # ------------------------------------------------------------------ config only (memory plan)
    def config_from_dict(self, config_dict: dict):
        """The thinker's config object from a config.json dict: a full Omni config's `thinker_config`, or
        a thinker config itself (defaults filled in as loading would)."""
        from transformers import CONFIG_MAPPING

        model_type = config_dict.get("model_type")
        if model_type not in self.model_types:
            raise ValueError(f"{self.family}: config model_type {model_type!r} is not one of {self.model_types}")
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
        return config.thinker_config if model_type == self.model_types[0] else config

    def meta_model(self, config_dict: dict) -> nn.Module:
        """The thinker on the meta device (no memory, no weights): only its shapes are used."""
        import transformers

        config = self.config_from_dict(config_dict)
        with torch.device("meta"):
            return getattr(transformers, self.thinker_class)(config)

    def mlp_width(self, text_config) -> int:
        """MLP activation width per token of the text model."""
        return int(text_config.intermediate_size)

    # ------------------------------------------------------------------ audio positions
    def tokens_for_frames(self, n_frames: int, n_window: int) -> int:
        """The family's formula: audio positions of one clip of `n_frames` valid mel frames."""
        raise NotImplementedError

    def num_audio_tokens(self, processor, n_frames):
        return self.tokens_for_frames(n_frames, int(getattr(processor, "n_window", 50)))

    def audio_tokens_per_window(self, audio_config) -> int:
        return self.tokens_for_frames(RELEASED_WINDOW_FRAMES, int(audio_config.n_window))

    def audio_output_lengths(self, model, n_frames: torch.Tensor) -> list[int]:
        """Audio positions per clip for the valid frame counts [C] (as the tower computes them)."""
        n_window = int(self.audio_tower(model).config.n_window)
        return [self.tokens_for_frames(int(n), n_window) for n in n_frames.tolist()]

    def dims(self, config_dict: dict):
        """`ModelDims` of the thinker (the talker and vocoder are never loaded, so they are not counted;
        the vision tower is, as `other_params`: it is loaded but never runs)."""
        model = self.meta_model(config_dict)
        text, audio = model.config.text_config, model.config.audio_config
        return self.dims_of(
            model,
            mlp_width=self.mlp_width(text),
            audio_frames=RELEASED_WINDOW_FRAMES,
            audio_tokens_per_window=self.audio_tokens_per_window(audio),
            num_experts=int(getattr(text, "num_experts", 0) or 0),
            experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0),
        )

    # ------------------------------------------------------------------ loading
    def thinker_config(self, folder: Path):
        """The thinker's config from a full Omni folder (its `thinker_config`) or a thinker-only folder."""
        import transformers

        raw = json.loads((Path(folder) / "config.json").read_text())
        full_type = self.model_types[0]
        if raw.get("model_type") == full_type:
            if "thinker_config" not in raw:
                raise ValueError(f"{folder}/config.json: model_type {full_type!r} without thinker_config")
            return transformers.AutoConfig.from_pretrained(folder, local_files_only=True).thinker_config
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)

    def load(self, folder, *, dtype, attn_implementation, device):
        import transformers

        processor = load_omni_processor(folder, getattr(transformers, self.processor_class))
        thinker_cls = getattr(transformers, self.thinker_class)
        model = thinker_cls.from_pretrained(
            folder,
            config=self.thinker_config(folder),
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            use_safetensors=True,  # weights never come from a pickle (.bin): loading one can run code
        )
        return model.to(device).eval(), processor

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _multimodal(model) -> nn.Module:
        """The module holding the towers and `get_audio_features`: `model.model` in transformers 5.2x,
        the thinker itself in earlier 5.x (where `model.model` is the text model)."""
        return model.model if hasattr(model.model, "audio_tower") else model

    def text_model(self, model):
        holder = self._multimodal(model)
        return holder.language_model if holder is model.model else model.model

    def audio_tower(self, model):
        return self._multimodal(model).audio_tower

    def vision_tower(self, model) -> nn.Module:
        return self._multimodal(model).visual

    def fixed_parameters(self, model):
        # mapo never feeds images or video: the vision tower never runs, so it never trains.
        return list(self.vision_tower(model).parameters())

    def fsdp_units(self, model):
        return [*self.decoder_layers(model), *self.audio_encoder_layers(model), self.vision_tower(model)]

    def new_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=self.text_model(model).config)

    # ------------------------------------------------------------------ operations
    def encode_audio(self, model, input_features, feature_attention_mask):
        """The model's own `get_audio_features`: the valid frames of all clips concatenated, windowed
        attention inside the tower, projection to the text width; split back into one tensor per clip."""
        tower = self.audio_tower(model)
        weight = next(tower.parameters())
        features = input_features.to(weight.device, weight.dtype)
        mask = feature_attention_mask.to(weight.device)
        encoded = self._multimodal(model).get_audio_features(features, mask).last_hidden_state  # [Σ n_c, H]
        counts = self.audio_output_lengths(model, mask.sum(-1))
        if sum(counts) != encoded.shape[0]:
            raise RuntimeError(f"{self.family}: the audio tower returned {encoded.shape[0]} positions, expected {counts}")
        return list(encoded.split(counts, dim=0))


class Qwen25OmniThinkerAdapter(OmniThinkerAdapter):
    """`Qwen2_5OmniThinkerForConditionalGeneration` (the thinker of Qwen2.5-Omni-3B/7B)."""

    family = "qwen2_5_omni"
    model_types = ("qwen2_5_omni", "qwen2_5_omni_thinker")
    processor_types = ("Qwen2_5OmniProcessor",)
    thinker_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    processor_class = "Qwen2_5OmniProcessor"

    def tokens_for_frames(self, n_frames, n_window):
        return qwen25_omni_audio_tokens(n_frames)  # 750 for the 30 s window


class Qwen3OmniMoeThinkerAdapter(OmniThinkerAdapter):
    """`Qwen3OmniMoeThinkerForConditionalGeneration` (the thinker of Qwen3-Omni-30B-A3B, the paper's model)."""

    family = "qwen3_omni_moe"
    model_types = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
    processor_types = ("Qwen3OmniMoeProcessor",)
    thinker_class = "Qwen3OmniMoeThinkerForConditionalGeneration"
    processor_class = "Qwen3OmniMoeProcessor"

    def tokens_for_frames(self, n_frames, n_window):
        return qwen3_omni_audio_tokens(n_frames, n_window)  # 390 for the 30 s window

    def mlp_width(self, text_config):
        """MoE layers: the routed experts' widths (no shared expert in this family); dense layers
        (`mlp_only_layers`) use intermediate_size; the wider of the two sizes the activations."""
        routed = int(text_config.num_experts_per_tok) * int(text_config.moe_intermediate_size)
        dense = int(text_config.intermediate_size) if text_config.mlp_only_layers else 0
        return max(routed, dense)

    def clip_feature_kwargs(self, processor) -> dict[str, Any]:
        # The processor's audio defaults: pad only to the longest clip of the call, never truncate.
        return {"padding": "longest", "truncation": False}



register_adapter(Qwen25OmniThinkerAdapter())
register_adapter(Qwen3OmniMoeThinkerAdapter())
