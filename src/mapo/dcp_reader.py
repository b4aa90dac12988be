"""A `torch.distributed.checkpoint` reader that does not run code from a checkpoint's `.metadata`.

DCP's own `FileSystemReader.read_metadata` is a plain `pickle.load` of `state/.metadata`: a checkpoint
folder from elsewhere (a shared run directory, a downloaded run) could run any code on `trainer.resume` or
`make export`. `SafeFileSystemReader` reads the same file through an unpickler that resolves only an exact
allow-list of (module, name) pairs (`ALLOWED_GLOBALS` and the torch dtypes) and refuses every other global,
and every dotted name (pickle ≥ 4 resolves `a.b` attribute by attribute, so `("<allowed module>",
"os.system")` would reach `os.system`), with an error naming the file and the global. Whole modules are
never allowed: `torch.distributed.checkpoint` also holds plain functions such as
`format_utils.torch_save_to_dcp`, which unpickles a file with `weights_only=False`.

How the list was derived (torch 2.13): a recording `Unpickler.find_class` over the `.metadata` of
checkpoints written by `mapo.checkpoint.save_checkpoint` (an `nn.Linear` with AdamW, as the tests save
it; a model with bf16, fp16, int64, int8 and bool tensors and an optimizer holding a string, i.e. bytes
entries) and by a plain `dcp.save` of tensors, ints, strings and nested objects; `pickletools.dis` shows
the same globals. Every one of them is below: DCP's metadata dataclasses and the `_MEM_FORMAT_ENCODING`
enum, `filesystem._StorageInfo`, `torch.Size`, a layout as `torch.serialization._get_layout("torch.strided")`
(a look-up in torch's layouts), the checkpoint id as a `pathlib.PosixPath`, and each dtype as the global
`torch.<dtype>` (allowed for every name whose `torch` attribute is a `torch.dtype`). A future torch whose
metadata names something else is refused with the name in the error, to be added here after a look.
The tensor and bytes entries are read as before (bytes entries go through `torch.load(weights_only=True)`
in `mapo.checkpoint._WeightsOnlyLoadPlanner`).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA = "torch.distributed.checkpoint.metadata"
#: The exact (module, name) pairs DCP metadata refers to, besides the dtypes (see the module docstring).
ALLOWED_GLOBALS = frozenset({
    (_METADATA, "Metadata"),
    (_METADATA, "TensorStorageMetadata"),
    (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"),
    (_METADATA, "TensorProperties"),
    (_METADATA, "MetadataIndex"),
    (_METADATA, "StorageMeta"),
    (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
})
#: How torch pickles a dtype: the global `torch.<name>`.
ALLOWED_DTYPES = frozenset(
    ("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype))


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata names something other than DCP's own plain types."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if "." in name:
            raise UnsafeCheckpointError(
                f"{self.path}: the checkpoint metadata refers to {module}.{name}, a dotted name (it would reach "
                "past the module it names); refusing to load it (a checkpoint from elsewhere must not run code)")
        if (module, name) in ALLOWED_GLOBALS or (module, name) in ALLOWED_DTYPES:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: the checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never "
            "holds; refusing to load it (a checkpoint from elsewhere must not run code)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` whose metadata is unpickled with `_MetadataUnpickler`, each file once: a later
    `read_metadata` (e.g. `dcp.load`'s own, after the caller's) returns the object already read."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metadata: dict[str, Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if hasattr(self, "_get_metadata_path"):  # torch ≥ 2.7: one metadata file per rank is possible
            path = self._get_metadata_path(kwargs.get("rank"))
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        metadata = self._metadata.get(str(path))
        if metadata is None:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream, str(path)).load()
            if not isinstance(metadata, Metadata):
                raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._metadata[str(path)] = metadata
        metadata.storage_meta.load_id = self.load_id  # as DCP's reader: the id of this load (reset renews it)
        return metadata
