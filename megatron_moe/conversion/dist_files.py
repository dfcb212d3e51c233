"""Our torch_dist checkpoints read and written one tensor at a time, without a model or a process group.

A megatron-core ``torch_dist`` checkpoint is a torch.distributed.checkpoint (DCP) folder whose tensors
are stored under layout-independent keys (``decoder.layers.3.mlp.experts.experts.linear_fc1.weight``,
global shape ``[experts, 2 x ffn, hidden]``), each as the chunks the saving ranks held, plus megatron's
``metadata.json`` and ``common.pt``. :class:`CheckpointReader` reads any slice of a global tensor from
whatever chunks cover it (DCP's resharding read plan, run by the storage reader directly: no
``dcp.load``, so no process group and no re-reading of the metadata). :func:`write_checkpoint` writes
the tensors of a megatron sharded state dict whose data is produced on demand, one chunk at a time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_moe.conversion.hf_layout import ConversionError


class _IntoTensor(LoadPlanner):
    """The storage reader's callbacks for one read plan: every item lands in its part of ``out``."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, read_item):
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:  # resolve_tensor returned a view of ``out``
        return None

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are read")

    def set_up_planner(self, *args, **kwargs):
        return None

    def create_local_plan(self):
        raise AssertionError("plans are made by CheckpointReader")

    create_global_plan = finish_plan = create_local_plan


class CheckpointReader:
    """The global tensors of one checkpoint iteration directory, by key."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self._reader = FileSystemReader(str(self.directory))
            metadata = self._reader.read_metadata()
            self._reader.set_up_storage_reader(metadata, is_coordinator=True)
        except Exception as error:
            raise ConversionError(f"cannot read {self.directory}/.metadata ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''}); the checkpoint is damaged") from error
        self.tensors: Dict[str, TensorStorageMetadata] = {
            key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)}

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, index: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key``, or its ``index``-th slice along the first axis (one expert)."""
        size = self.shape(key)
        offsets = [0] * len(size)
        sizes = list(size)
        if index is not None:
            offsets[0], sizes[0] = index, 1
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        try:
            out = self._stored_chunk(key, chunk)
            if out is None:  # assembled from the chunks that cover it (another layout's shards)
                out = torch.empty(sizes, dtype=self.dtype(key))
                plan = LoadPlan(create_read_items_for_chunk_list(key, self.tensors[key], [chunk]))
                self._reader.read_data(plan, _IntoTensor(out)).wait()
        except Exception as error:  # a truncated or corrupt .distcp file
            raise ConversionError(f"cannot read {key} from {self.directory} ({type(error).__name__}: "
                                  f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                                  "the checkpoint is damaged") from error
        return out[0] if index is not None else out

    def _stored_chunk(self, key: str, chunk: ChunkStorageMetadata) -> Optional[torch.Tensor]:
        """The chunk as it was saved, loaded in place, when one saved chunk is exactly it (every tensor of
        a one-process checkpoint, every expert of any): no second buffer and no copy, which halves the
        peak memory of the vocabulary-sized tensors. None otherwise."""
        if not any(stored.offsets == chunk.offsets and stored.sizes == chunk.sizes for stored in self.tensors[key].chunks):
            return None
        where = self._reader.storage_data.get(MetadataIndex(key, chunk.offsets))
        if where is None or where.transform_descriptors:
            return None
        with open(self.directory / where.relative_path, "rb") as file:
            tensor = torch.load(_FileSlice(file, where.offset, where.length), map_location="cpu", weights_only=True)
        if tensor.shape != chunk.sizes:
            raise ValueError(f"stored shape {tuple(tensor.shape)}, the metadata says {tuple(chunk.sizes)}")
        return tensor


class _FileSlice(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file as a seekable stream of their own, which is
    what torch.load needs to read one stored tensor straight into its storage."""

    def __init__(self, file, offset: int, length: int):
        self._file, self._start, self._end = file, offset, offset + length
        file.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell() - self._start

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: self._start, io.SEEK_CUR: self._file.tell(), io.SEEK_END: self._end}[whence]
        return self._file.seek(min(max(base + position, self._start), self._end)) - self._start

    def readinto(self, buffer) -> int:
        return self._file.readinto(memoryview(buffer).cast("B")[: self._end - self._file.tell()])


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------

class _Producer(DefaultSavePlanner):
    """DCP's default global planning over a local plan made here, whose data is produced on demand."""

    def __init__(self, items: Sequence[WriteItem], produce: Callable[[WriteItem], object]):
        super().__init__()
        self._items, self._produce = list(items), produce

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._produce(write_item)


def tensor_write_item(key: str, global_shape, offsets, sizes, dtype: torch.dtype) -> WriteItem:
    return WriteItem(index=MetadataIndex(key, torch.Size(offsets)), type=WriteItemType.SHARD,
                     tensor_data=TensorWriteData(
                         chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                         properties=TensorProperties(dtype=dtype), size=torch.Size(global_shape)))


def object_write_item(key: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)


def serialised_objects(values: Iterable[object]) -> io.BytesIO:
    """A megatron ShardedObject as its torch_dist strategy stores one: the list of its local values."""
    buffer = io.BytesIO()
    torch.save(list(values), buffer)
    buffer.seek(0)
    return buffer


def write_checkpoint(directory: Path, items: Sequence[WriteItem], produce: Callable[[WriteItem], object],
                     common: dict) -> None:
    """A torch_dist checkpoint in ``directory``: ``items`` (their data from ``produce``, called once per
    item, in turn), megatron's ``common.pt`` and ``metadata.json``."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import save

    directory.mkdir(parents=True, exist_ok=True)
    # one file per item: torch's writer keeps every tensor of a file until the file is closed
    writer = FileSystemWriter(str(directory), single_file_per_rank=False, thread_count=1, sync_files=False)
    save({}, storage_writer=writer, planner=_Producer(items, produce), no_dist=True)
    torch.save(common, directory / "common.pt")
    save_config(CheckpointingConfig("torch_dist"), str(directory))
