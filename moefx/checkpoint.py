"""Safetensors checkpoints on disk, one tensor at a time: headers, streamed shard writes, lazy reads.

moefx reads and writes safetensors files itself where it must not hold a whole file in memory:

* :func:`read_header` parses a file's header only (names, dtypes, shapes, offsets), so a plan can be made
  without reading a weight; :func:`read_tensor` reads one tensor with ``pread`` into a fresh buffer (no
  memory map, so a conversion's resident memory stays one layer, not the files it has touched).
* :class:`ShardWriter` writes one file sequentially from a header computed up front, hashing the bytes as
  they go, under a temporary name that is renamed into place only when the file is complete. Its bytes are
  exactly what ``safetensors.torch.save`` writes for the same tensors and metadata (same tensor order, same
  header JSON, same padding), so a streamed conversion and ``moefx.save`` give identical files.
* :func:`lazy_state_dict` maps the files of a checkpoint (one file, or Hugging Face shards with
  ``model.safetensors.index.json``) into memory without reading them: pages are read when a tensor is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import ModelLoadError, MoefxError, first_line

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "ShardWriter",
    "TensorEntry",
    "check_safetensors",
    "checkpoint_files",
    "dtype_from_safetensors",
    "file_order",
    "header_bytes",
    "hf_key_resolver",
    "lazy_state_dict",
    "read_checkpoint_entries",
    "read_header",
    "read_tensor",
    "sha256_file",
    "shard_names",
    "write_index",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
#: The order safetensors lays tensors out in a file: by dtype (this order), then by name.
_DTYPE_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E5M2FNUZ",
                "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_RANK = {name: i for i, name in enumerate(_DTYPE_ORDER)}


def dtype_from_safetensors(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"safetensors dtype {name} is not supported by moefx") from None


def safetensors_dtype(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ModelLoadError(f"{dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are (absolute offsets in the file)."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and the ``__metadata__`` of one safetensors file, reading only its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > min(size - 8, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({exc}); re-download or regenerate it") from None
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    base = 8 + n
    for name, info in header.items():
        start, end = info["data_offsets"]
        if base + end > size:
            raise ModelLoadError(f"{path}: truncated (tensor {name} ends beyond the file); re-download or regenerate it")
        entries[name] = TensorEntry(path, name, dtype_from_safetensors(info["dtype"]), tuple(info["shape"]),
                                    base + start, base + end)
    return entries, metadata


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory: the shards its index names, or ``model.safetensors``."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc}); regenerate it") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise ModelLoadError(f"{index}: names {missing[0]}, which does not exist; the checkpoint is incomplete")
        return [directory / f for f in files]
    single = directory / SINGLE_NAME
    if single.exists():
        return [single]
    raise ModelLoadError(f"{directory}: has no {SINGLE_NAME} nor {INDEX_NAME}; pass a directory with safetensors weights")


def read_checkpoint_entries(directory: Path) -> tuple[dict[str, TensorEntry], list[Path]]:
    """Every tensor of the checkpoint in ``directory`` (one file or shards), by name, from the headers alone;
    and its files. A name stored in two files is a :class:`ModelLoadError`."""
    files = checkpoint_files(directory)
    entries: dict[str, TensorEntry] = {}
    for path in files:
        for name, entry in read_header(path)[0].items():
            if name in entries:
                raise ModelLoadError(f"{directory}: tensor {name} is in both {entries[name].file.name} and "
                                     f"{path.name}; the checkpoint is inconsistent")
            entries[name] = entry
    return entries, files


def check_safetensors(path: Path, error: type[MoefxError] = ModelLoadError, fix: str = "") -> None:
    """Raise ``error`` naming ``path`` if it is missing or not a complete safetensors file (header and data)."""
    if not path.is_file():
        raise error(f"{path}: missing" + (f"; {fix}" if fix else ""))
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:
        raise error(f"{path}: truncated or corrupt ({first_line(exc)})" + (f"; {fix}" if fix else "")) from None


def read_tensor(entry: TensorEntry, fd: int | None = None) -> torch.Tensor:
    """One tensor read from disk into new memory (``pread``; no memory map)."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    own = fd is None
    if own:
        fd = os.open(entry.file, os.O_RDONLY)
    try:
        done = 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done:]], entry.start + done)
            if got <= 0:
                raise ModelLoadError(f"{entry.file}: truncated while reading {entry.name}")
            done += got
    finally:
        if own:
            os.close(fd)
    return buf.view(entry.dtype).reshape(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)


def file_order(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """Names in the order safetensors writes them: by dtype (widest first), then by name."""
    return sorted(tensors, key=lambda name: (_RANK[safetensors_dtype(tensors[name][0])], name))


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def header_bytes(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The 8-byte length, the JSON header and its padding, exactly as safetensors writes them, and the order
    the tensors' bytes follow in."""
    order = file_order(tensors)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": safetensors_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in :func:`file_order`, under ``<name>.tmp``.

    ``commit()`` flushes, syncs and renames the file into place and returns its sha256; a writer that is
    closed without committing removes its temporary file, so a complete-looking shard is always complete.
    """

    def __init__(self, path: str | os.PathLike, tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        head, self.order = header_bytes(tensors, metadata)
        self._shapes = dict(tensors)
        self._next = 0
        self._hash = hashlib.sha256()
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit/abort
        # Hashing and writing release the GIL: a thread does them while the caller makes the next tensor.
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"moefx-write-{self.path.name}", daemon=True)
        self._thread.start()
        self._queue.put(head)
        self.bytes_written = len(head)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write(memoryview(item.numpy()) if isinstance(item, torch.Tensor) else item)
                except BaseException as exc:
                    self._error = exc

    def _finish_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    @property
    def next_name(self) -> str | None:
        return self.order[self._next] if self._next < len(self.order) else None

    def _write(self, data) -> None:
        self._hash.update(data)
        self._file.write(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name != self.next_name:
            raise RuntimeError(f"{self.path.name}: expected {self.next_name}, got {name}")
        dtype, shape = self._shapes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"{self.path.name}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                               f"the header says {dtype} {tuple(shape)}")
        if self._error is not None:
            self._finish_thread()
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            data = flat.view(torch.uint8)
            self._queue.put(data)
            self.bytes_written += data.numel()
        self._next += 1

    def commit(self) -> str:
        if self.next_name is not None:
            raise RuntimeError(f"{self.path.name}: {len(self.order) - self._next} tensors not written")
        self._finish_thread()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._hash.hexdigest()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._finish_thread()
        if not self._file.closed:
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_names(count: int) -> list[str]:
    """Hugging Face shard file names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    data = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(data, indent=2) + "\n")


def lazy_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a checkpoint directory, memory-mapped (read only when used), and the merged
    ``__metadata__`` of its files (``safetensors.torch.save_model`` records dropped shared names there)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in checkpoint_files(directory):
        entries, meta = read_header(path)
        metadata.update(meta)
        size = os.path.getsize(path)
        # MAP_PRIVATE: pages are read on first use and never written back to the file.
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        whole = torch.empty(0, dtype=torch.uint8).set_(storage)
        for name, e in entries.items():
            if e.nbytes == 0:
                tensors[name] = torch.empty(e.shape, dtype=e.dtype)
            else:
                tensors[name] = whole[e.start:e.end].view(e.dtype).reshape(e.shape)
    return tensors, metadata


def iter_entries(files: Iterable[Path]) -> Iterator[TensorEntry]:
    for path in files:
        yield from read_header(path)[0].values()


def hf_key_resolver(model: torch.nn.Module, keys: Iterable[str]) -> Callable[[str], str | None]:
    """``resolve(name)``: the checkpoint key, among ``keys``, that holds the model's tensor ``name``, or None.

    A transformers model loads a checkpoint whose names differ from its own in two ways, and so does this: the
    base-model prefix (``bert.``) present on one side only, and the renamings transformers applies on load
    (GPT-NeoX's ``embed_out.`` is ``lm_head.``, old ``LayerNorm.gamma`` is ``.weight``). Conversions that
    merge or split tensors are not renamings: their keys resolve to nothing.
    """
    ordered = list(keys)  # in the checkpoint's order: of two keys renamed to one name, the first wins
    keys = set(ordered)
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed: dict[str, str] = {}  # the model's name -> the checkpoint's
    try:
        # optional: needs moefx[hf] (and a transformers with these mappings)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        for key in ordered:
            new, converter = rename_source_key(key, renamings, converters)
            if converter is None and new != key:
                renamed.setdefault(new, key)
    except Exception:  # not a transformers model, or a transformers without these mappings: names as they are
        renamed = {}

    def resolve(name: str) -> str | None:
        for candidate in (name, name.removeprefix(prefix + "."), f"{prefix}.{name}" if prefix else name):
            if candidate in keys:
                return candidate
            if candidate in renamed:
                return renamed[candidate]
        return None

    return resolve
