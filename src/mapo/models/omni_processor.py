"""The Qwen Omni processors without torchvision: mapo feeds audio and text, never video.

`Qwen2_5OmniProcessor` and `Qwen3OmniMoeProcessor` take an image processor, a video processor, a Whisper
feature extractor and a tokenizer. transformers 5.24 implements the video processor
(`Qwen2VLVideoProcessor`) on torchvision only, and torchvision is not installable next to the CPU torch
build of these machines (the PyPI wheel's C operators fail to load against it). Instead of giving up on
the processors' own chat template, placeholder expansion and `__call__`, the video slot gets
`NoVideoProcessor`: a stand-in that refuses video and saves the standard `Qwen2VLVideoProcessor`
settings, so a folder mapo writes stays loadable by stock transformers where torchvision exists.

`build_omni_processor(processor_cls, ...)` constructs one with the stand-in: the processor's constructor
checks each part against a base class, and without torchvision transformers cannot even look the video
base class up (`VideoProcessorMixin` is not exported and the video registry is a placeholder), so the
check accepts `NoVideoProcessor` for the video slot of this one instance while it is built; every other
part is checked as usual. `load_omni_processor(folder, processor_cls)` rebuilds a saved processor the way
`from_pretrained` does (the Auto classes for tokenizer, feature extractor and image processor, the
folder's chat template). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer
from transformers.video_processing_utils import BaseVideoProcessor

#: Settings of `Qwen2VLVideoProcessor` that the Omni processors read (token counts of a video grid);
#: the Qwen2.5-Omni / Qwen3-Omni defaults. A folder's own values replace them.
VIDEO_DEFAULTS: dict[str, Any] = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}


class NoVideoProcessor(BaseVideoProcessor):
    """Fills the video slot of an Omni processor; any video input is an error (mapo is audio + text).

    Its saved form names `Qwen2VLVideoProcessor` with the kept settings, so stock transformers (with
    torchvision) loads the folder with the real video processor.
    """

    def __init__(self, **settings: Any) -> None:  # no super().__init__: that needs torchvision
        self.settings = {**VIDEO_DEFAULTS, **{k: v for k, v in settings.items() if not k.startswith("_")}}
        self.settings.pop("video_processor_type", None)
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            setattr(self, name, self.settings[name])

    def __call__(self, *args: Any, **kwargs: Any):
        raise ValueError("mapo feeds audio and text only: this processor has no video processor (NoVideoProcessor)")

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings, "video_processor_type": "Qwen2VLVideoProcessor"}

    def __repr__(self) -> str:
        return f"NoVideoProcessor({self.settings})"


def build_omni_processor(processor_cls: type, *, chat_template: str | None = None, **parts: Any):
    """`processor_cls(**parts, chat_template=...)` with a `NoVideoProcessor` as `parts["video_processor"]`."""
    if not isinstance(parts.get("video_processor"), NoVideoProcessor):
        raise TypeError(f"video_processor must be a NoVideoProcessor, got {type(parts.get('video_processor')).__name__}")
    processor = processor_cls.__new__(processor_cls)
    class_check = processor.check_argument_for_proper_class

    def check(argument_name: str, argument: Any):
        if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
            return NoVideoProcessor
        return class_check(argument_name, argument)

    processor.check_argument_for_proper_class = check  # this instance only, while its constructor runs
    try:
        processor.__init__(chat_template=chat_template, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def load_omni_processor(folder: str | Path, processor_cls: type):
    """`processor_cls.from_pretrained(folder)` with `NoVideoProcessor` in the video slot (local files only)."""
    folder = str(folder)
    processor_dict, _ = processor_cls.get_processor_dict(folder, local_files_only=True)
    loaders = {
        "tokenizer": lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True),
        "feature_extractor": lambda: AutoFeatureExtractor.from_pretrained(folder, local_files_only=True),
        "image_processor": lambda: AutoImageProcessor.from_pretrained(folder, local_files_only=True),
        "video_processor": lambda: NoVideoProcessor(**(processor_dict.get("video_processor") or {})),
    }
    unknown = [a for a in processor_cls.get_attributes() if a not in loaders]
    if unknown:
        raise ValueError(f"{folder}: {processor_cls.__name__} needs {unknown}, which mapo does not know how to load")
    parts = {attribute: loaders[attribute]() for attribute in processor_cls.get_attributes()}
    return build_omni_processor(processor_cls, chat_template=processor_dict.get("chat_template"), **parts)
