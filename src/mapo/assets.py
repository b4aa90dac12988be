"""What a run needs before it starts: the data and the model, built locally when the config allows it.

`make train` from a fresh clone needs nothing else: with `data.generate_if_missing` the synthetic
benchmark is written, with `model.build_tiny_if_missing` the tiny model is built (its tokenizer trains
on that benchmark's text). Nothing is ever downloaded. Only rank 0 builds; the others wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mapo.config import DataConfig, ModelConfig
from mapo.data.schema import Record
from mapo.data.validate import ManifestResult, read_manifest
from mapo.models.loader import check_model_folder


def manifest_path(data: DataConfig, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else Path(data.dir) / path


def ensure_data(data: DataConfig, seed: int) -> None:
    """Write the synthetic benchmark into `data.dir` when its training manifest is missing and allowed."""
    if manifest_path(data, data.train).is_file():
        return
    if not data.dir:
        raise ValueError(f"data.dir is empty: set data.dir=/path/to/folder with {data.train} (data={data.name})")
    if not data.generate_if_missing:
        raise FileNotFoundError(
            f"{manifest_path(data, data.train)}: training manifest not found (data={data.name}; set data.dir, "
            "or data.generate_if_missing=true for the synthetic benchmark)"
        )
    from mapo.data.synthetic import SyntheticConfig, write_benchmark

    print(f"[mapo] building the synthetic benchmark in {data.dir}")
    print(write_benchmark(SyntheticConfig(out_dir=data.dir, seed=seed)).format())


def ensure_model(model: ModelConfig, data: DataConfig) -> None:
    """Build the tiny model at `model.path` when it is missing and `model.build_tiny_if_missing` is set."""
    if not model.path:
        raise ValueError(
            "model.path is empty: set model.path=/path/to/Qwen2-Audio-7B-Instruct (a local folder with "
            "config.json, safetensors weights, tokenizer and preprocessor files; nothing is downloaded)"
        )
    if not model.build_tiny_if_missing:
        check_model_folder(model.path)  # fail now, before any data work, saying what the folder must hold
        return
    if (Path(model.path) / "config.json").is_file():
        return
    from mapo.models.tiny import TinyModelConfig, write_tiny

    print(f"[mapo] building the tiny {model.tiny_family} model in {model.path}")
    write_tiny(TinyModelConfig(family=model.tiny_family, out_dir=model.path, corpus=str(manifest_path(data, data.train))))


def load_split(data: DataConfig, name: str) -> list[Record]:
    """Records of one manifest, checked as `data` says (bad rows stop unless data.skip_bad)."""
    return check_split(data, name).records


def check_split(data: DataConfig, name: str, window_seconds: float | None = None, *, is_main: bool = True,
                share: Callable[[list[int]], list[int]] | None = None) -> ManifestResult:
    """One manifest checked as `data` says (audio decoded in parallel on rank 0, with a progress bar).

    Bad rows stop the run unless data.skip_bad; skips and conversions are printed (rank 0).
    share: with several processes, returns rank 0's list on every rank (see `read_manifest`).
    """
    result = read_manifest(
        manifest_path(data, name), layout=data.layout, skip_bad=data.skip_bad, check_audio=is_main,
        share=share, report=is_main, audio_check=data.audio_check, window_seconds=window_seconds,
        allow_outside_paths=data.allow_outside_paths, workers=data.check_workers, progress=is_main,
    )
    if is_main:
        if result.skipped:
            print(f"[mapo] {result.path}: skipped {result.skipped} bad row(s) of {result.n_rows} (data.skip_bad=true)")
        for note in result.notes(window_seconds):
            print(f"[mapo] {result.path}: {note}")
    return result


@dataclass
class RunData:
    """The checked records of a run and what the check counted (reported in the run summary).

    train:     the training records; eval_sets: split name -> records (before any cap on their size).
    counts:    "data/skipped_rows" (bad rows dropped with data.skip_bad, all manifests),
               "data/clips_over_window" (rows whose clip will be cut), "data/clips_resampled",
               "data/clips_downmixed" (distinct clips converted).
    """

    train: list[Record]
    eval_sets: dict[str, list[Record]]
    counts: dict[str, int] = field(default_factory=dict)


def audio_window_seconds(model_path: str | Path) -> float | None:
    """The audio window of the model's feature extractor (`chunk_length`, seconds), read from its folder
    before any model loads; None when the folder does not say, or when the family's encoder takes clips
    of any length (the Omni thinkers: nothing is cut). The collator still counts what it cuts."""
    from mapo.models.adapter import adapter_for_folder
    from mapo.models.loader import read_feature_extractor_settings

    folder = Path(model_path)
    # A property of the family (no model is built: preflight and the plan build the meta model once).
    if (folder / "config.json").is_file() and not adapter_for_folder(folder).audio_window_fixed:
        return None
    settings = read_feature_extractor_settings(folder) or {}
    return float(settings["chunk_length"]) if isinstance(settings.get("chunk_length"), (int, float)) else None


def load_run_data(data: DataConfig, model_path: str | Path, *, is_main: bool = True,
                  share: Callable[[list[int]], list[int]] | None = None) -> RunData:
    """Check every manifest of the run (train and eval splits) before any model loads."""
    window = audio_window_seconds(model_path)
    results = {"train": check_split(data, data.train, window, is_main=is_main, share=share)}
    for split, name in data.eval_splits.items():
        results[f"eval/{split}"] = check_split(data, name, window, is_main=is_main, share=share)
    counts = {
        "data/skipped_rows": sum(r.skipped for r in results.values()),
        "data/clips_over_window": sum(len(r.cut) for r in results.values()),
        "data/clips_resampled": sum(r.converted["resampled"] for r in results.values()),
        "data/clips_downmixed": sum(r.converted["downmixed"] for r in results.values()),
    }
    eval_sets = {split: results[f"eval/{split}"].records for split in data.eval_splits}
    return RunData(results["train"].records, eval_sets, counts)
