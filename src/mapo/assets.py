"""What a run needs before it starts: the data and the model, built locally when the config allows it.

`make train` from a fresh clone needs nothing else: with `data.generate_if_missing` the synthetic
benchmark is written, with `model.build_tiny_if_missing` the tiny model is built (its tokenizer trains
on that benchmark's text). Nothing is ever downloaded. Only rank 0 builds; the others wait for it.
"""

from __future__ import annotations

from pathlib import Path

from mapo.config import DataConfig, ModelConfig
from mapo.data.validate import read_manifest
from mapo.data.schema import Record
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
    """Records of one manifest, validated (bad rows stop the run unless data.skip_bad)."""
    result = read_manifest(manifest_path(data, name), layout=data.layout, skip_bad=data.skip_bad)
    if result.skipped:
        print(f"[mapo] {result.path}: skipped {result.skipped} bad row(s) of {result.n_rows} (data.skip_bad=true)")
    return result.records
