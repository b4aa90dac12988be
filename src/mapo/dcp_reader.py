"""A `torch.distributed.checkpoint` reader that does not run code from a checkpoint's `.metadata`.

DCP's own `FileSystemReader.read_metadata` is a plain `pickle.load` of `state/.metadata`: a checkpoint
folder from elsewhere (a shared run directory, a downloaded run) could run any code on `trainer.resume` or
`make export`. `SafeFileSystemReader` reads the same file through an unpickler that resolves only the
classes DCP's metadata is made of (its dataclasses and enums, torch dtypes, layouts and `torch.Size`,
paths) and refuses every other global with an error naming the file and the global. The tensor and
bytes entries are read as before (bytes entries go through `torch.load(weights_only=True)` in
`mapo.checkpoint._WeightsOnlyLoadPlanner`).
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

#: Modules whose every class may appear in DCP metadata (dataclasses and enums of plain values).
ALLOWED_MODULE_PREFIXES = ("torch.distributed.checkpoint.",)
#: Single globals DCP metadata refers to: how torch pickles a dtype, a layout, a memory format and a Size.
ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's metadata names something other than DCP's own plain types."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(ALLOWED_MODULE_PREFIXES) or (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: the checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never "
            "holds; refusing to load it (a checkpoint from elsewhere must not run code)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """`dcp.FileSystemReader` whose metadata is unpickled with `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if hasattr(self, "_get_metadata_path"):  # torch ≥ 2.7: one metadata file per rank is possible
            path = self._get_metadata_path(kwargs.get("rank"))
        else:
            path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
