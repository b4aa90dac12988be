"""Batches for the model: prompts for generation and prompt + reference completion for supervised training.

Each record becomes the chat text of `mapo.data.prompt.messages` (the processor's own chat template,
generation prompt), its audio placeholder (`processor.audio_token`: <|AUDIO|>, or <|audio_pad|> for
Qwen3-Omni) is expanded to the clip's number of audio positions, and the batch is tokenised with left
padding. The count and the feature extractor's settings for one clip are the family's
(`ModelAdapter.num_audio_tokens` / `clip_feature_kwargs`, found from the processor's class), so one
collator serves every family. The audio features are computed per clip (never per batch) and may be
cached by path, and padding is masked, so an item's outputs do not depend on what else is in its batch
(tested to 1e-4). Clips of different lengths (Qwen3-Omni does not pad to a window) are zero-padded to
the longest clip of the batch, with the padding masked out of `feature_attention_mask`.
`position_ids_from_mask` gives the positions `generate` uses (real tokens counted from 0); rotary
attention only sees position differences, so the plain 0..S-1 default differs by rounding only, but
passing them keeps a scoring forward identical to generation's prefill and within max_position.

This does what the processor's `__call__(text=..., audio=...)` does for one clip (the tests check
equality), split in two so the features of a clip can be computed once: feature extraction for thousands
of clips takes tens of seconds. (Qwen3-Omni's processor pads a batch's clips to the longest, which changes
the last frame or two of the shorter ones; ours are always the clip's features alone.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers import BatchEncoding

from mapo.data import prompt
from mapo.data.audio import AudioError, load_audio
from mapo.data.schema import Record
from mapo.models.adapter import adapter_for_processor
from mapo.models.embed import audio_span_mask, position_ids_from_mask  # noqa: F401  (part of the batching API)
from mapo.models.loader import audio_token_id

IGNORE_INDEX = -100  # label value the loss skips
TURN_END = "<|im_end|>"  # ends the assistant turn; the model must learn to emit it


def num_audio_tokens(n_frames: int) -> int:
    """Audio positions Qwen2-Audio's encoder yields for `n_frames` valid mel frames: conv stride 2, then pool 2.

    ((n - 1) // 2 + 1 - 2) // 2 + 1, e.g. 100 frames (1 s) → 50 → 25; 300 frames (3 s) → 150 → 75.
    Other families count differently: the collator asks the processor's adapter (`Collator.num_audio_tokens`).
    """
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass
class ClipFeatures:
    """One clip's log-mel features, stored without the constant tail of the zero-padded window.

    head: [n_mels, n_head] float32, the columns up to where the tail starts.
    tail: [n_mels] float32, the column repeated after `head` (padding of silence gives identical columns).
    n_frames_total: window length in frames; n_valid: frames that hold the clip (the feature mask).
    """

    head: torch.Tensor
    tail: torch.Tensor
    n_frames_total: int
    n_valid: int

    @classmethod
    def compress(cls, features: torch.Tensor, n_valid: int) -> "ClipFeatures":
        """features: [n_mels, frames] → lossless compact form (cuts the run of columns equal to the last one)."""
        equal_to_last = (features == features[:, -1:]).all(dim=0)  # [frames]
        # First index of the trailing run of True (the last column always equals itself).
        not_equal = (~equal_to_last).nonzero()
        tail_start = int(not_equal[-1]) + 1 if len(not_equal) else 0
        return cls(features[:, :tail_start].clone(), features[:, -1].clone(), features.shape[1], n_valid)

    def features(self) -> torch.Tensor:
        """The full window again: [n_mels, n_frames_total]."""
        n_tail = self.n_frames_total - self.head.shape[1]
        return torch.cat([self.head, self.tail[:, None].expand(-1, n_tail)], dim=1)

    def nbytes(self) -> int:
        return (self.head.numel() + self.tail.numel()) * self.head.element_size()


class FeatureCache:
    """In-memory cache of clip features keyed by audio path (one cache per processor / window).

    Unbounded: the tiny benchmark's clips take a few tens of KB each in compact form.
    """

    def __init__(self) -> None:
        self._clips: dict[str, ClipFeatures] = {}

    def get(self, path: str) -> ClipFeatures | None:
        return self._clips.get(path)

    def put(self, path: str, clip: ClipFeatures) -> None:
        self._clips[path] = clip

    def __len__(self) -> int:
        return len(self._clips)

    def __contains__(self, path: str) -> bool:
        return path in self._clips

    def nbytes(self) -> int:
        return sum(clip.nbytes() for clip in self._clips.values())


class Collator:
    """Turns Records into model batches (prompts for generation, supervised batches for the warm start).

    processor:     the family's processor (Qwen2AudioProcessor, Qwen2_5OmniProcessor, Qwen3OmniMoeProcessor:
                   tokenizer + Whisper feature extractor + chat template).
    audio_loader:  path → float32 mono samples at the feature extractor's rate (default: mapo's loader).
    feature_cache: optional FeatureCache shared across batches/epochs; None computes features every time.
    """

    def __init__(
        self,
        processor,
        audio_loader: Callable[[str], np.ndarray] = load_audio,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.audio_loader = audio_loader
        self.feature_cache = feature_cache
        self.audio_token = processor.audio_token
        self.audio_token_id = audio_token_id(processor)  # the processor's, or its tokenizer's for the placeholder
        self.adapter = adapter_for_processor(processor)
        self.feature_kwargs = self.adapter.clip_feature_kwargs(processor)
        #: Clips longer than the window, cut to it (counted per distinct path; the loop reports the count).
        self.cut_clips: set[str] = set()

    def num_audio_tokens(self, n_frames: int) -> int:
        """Audio placeholder positions of a clip with `n_frames` valid mel frames, for this family."""
        return self.adapter.num_audio_tokens(self.processor, n_frames)

    # -------------------------------------------------------------------------------- one record

    def prompt_text(self, record: Record) -> str:
        """Chat text of the record's user turn plus the assistant generation prompt; one <|AUDIO|> iff audio."""
        text = self.processor.apply_chat_template(prompt.messages(record), add_generation_prompt=True, tokenize=False)
        expected = 1 if record.audio is not None else 0
        found = text.count(self.audio_token)
        if found != expected:
            raise ValueError(
                f"record {record.id!r}: its prompt holds {found} {self.audio_token} placeholder(s), expected "
                f"{expected} (does the question or an option contain the token text?)"
            )
        return text

    def clip_features(self, path: str) -> ClipFeatures:
        """Features of one clip (from the cache when there), computed alone so batches cannot change them."""
        if self.feature_cache is not None and (cached := self.feature_cache.get(path)) is not None:
            return cached
        samples = self.audio_loader(path)
        extractor = self.feature_extractor
        truncates = self.feature_kwargs.get("truncation", True)
        if truncates and len(samples) > extractor.n_samples and path not in self.cut_clips:
            self.cut_clips.add(path)
            if len(self.cut_clips) == 1:  # one warning; the rest are counted (data/clips_cut_while_loading), not repeated
                warnings.warn(
                    f"{path}: {len(samples) / extractor.sampling_rate:.2f} s is longer than the "
                    f"{extractor.chunk_length} s audio window; the model sees only the first {extractor.chunk_length} s "
                    "(further clips cut to the window are counted in data/clips_cut_while_loading)",
                    stacklevel=3,
                )
        out = extractor(
            samples,
            sampling_rate=extractor.sampling_rate,
            return_attention_mask=True,
            return_tensors="pt",
            **self.feature_kwargs,
        )
        n_valid = int(out["attention_mask"][0].sum())
        if self.num_audio_tokens(n_valid) < 1:
            raise AudioError(path, "too_short", f"clip too short ({len(samples)} samples) to give one audio position")
        clip = ClipFeatures.compress(out["input_features"][0].to(torch.float32), n_valid)
        if self.feature_cache is not None:
            self.feature_cache.put(path, clip)
        return clip

    def _encode_prompts(self, records: list[Record]) -> tuple[list[list[int]], list[ClipFeatures]]:
        """Token ids of each prompt with its audio placeholder expanded, and the clips in batch order."""
        ids, clips = [], []
        for record in records:
            text = self.prompt_text(record)
            if record.audio is not None:
                clip = self.clip_features(record.audio)
                clips.append(clip)
                text = text.replace(self.audio_token, self.audio_token * self.num_audio_tokens(clip.n_valid))
            ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, clips

    # -------------------------------------------------------------------------------- batches

    def _audio_tensors(self, clips: list[ClipFeatures]) -> dict[str, torch.Tensor]:
        """input_features [A, n_mels, frames] and feature_attention_mask [A, frames] for the A clips, or {}.

        frames = the longest clip's frame count (the window for families that pad every clip to it); a
        shorter clip is zero-padded and its padding masked.
        """
        if not clips:
            return {}
        width = max(clip.n_frames_total for clip in clips)
        features = torch.zeros(len(clips), clips[0].head.shape[0], width)
        mask = torch.zeros(len(clips), width, dtype=torch.long)
        for row, clip in enumerate(clips):
            features[row, :, : clip.n_frames_total] = clip.features()
            mask[row, : clip.n_valid] = 1
        return {"input_features": features, "feature_attention_mask": mask}

    def _left_pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        """rows of lengths n_b → [B, max n_b], each row right-aligned after `value` padding."""
        width = max(len(row) for row in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for b, row in enumerate(rows):
            if row:
                out[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out

    def prompts(self, records: list[Record]) -> BatchEncoding:
        """Generation batch, left padded.

        input_ids, attention_mask: [B, S]; input_features: [A, n_mels, frames] and
        feature_attention_mask: [A, frames] for the A ≤ B records that have audio, in batch order (the
        model fills the <|AUDIO|> positions row by row); both are absent when no record has audio.
        """
        if not records:
            raise ValueError("empty batch")
        ids, clips = self._encode_prompts(records)
        input_ids = self._left_pad(ids, self.tokenizer.pad_token_id)
        attention_mask = self._left_pad([[1] * len(row) for row in ids], 0)
        return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask, **self._audio_tensors(clips)})

    def supervised(self, records: list[Record]) -> dict[str, torch.Tensor]:
        """Warm-start batch: prompt + reference completion + <|im_end|>, left padded.

        input_ids, attention_mask, position_ids, labels: [B, S]; labels = input_ids on the completion
        tokens (including <|im_end|>) and IGNORE_INDEX on prompt and padding. The completion is tokenised
        on its own, so the prompt tokens are exactly those of `prompts()`.
        Plus input_features / feature_attention_mask as in `prompts()`.
        """
        if not records:
            raise ValueError("empty batch")
        prompt_ids, clips = self._encode_prompts(records)
        rows, label_rows = [], []
        for record, ids in zip(records, prompt_ids):
            completion = self.tokenizer(prompt.reference_completion(record) + TURN_END, add_special_tokens=False)["input_ids"]
            rows.append(ids + completion)
            label_rows.append([IGNORE_INDEX] * len(ids) + completion)
        input_ids = self._left_pad(rows, self.tokenizer.pad_token_id)
        attention_mask = self._left_pad([[1] * len(row) for row in rows], 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "labels": self._left_pad(label_rows, IGNORE_INDEX),
            **self._audio_tensors(clips),
        }
