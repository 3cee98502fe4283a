"""Streaming safetensors reader/writer (single files and HF sharded checkpoints).

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw bytes. Reading it directly gives bf16 support
via `ml_dtypes` and lets converters pull one tensor at a time, so a conversion holds about one
copy of the model, never two. Nothing here unpickles anything.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile(Mapping[str, np.ndarray]):
  """One .safetensors file, memory-mapped; `f[name]` returns a private copy of one tensor."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    with open(self.path, "rb") as fh:
      raw = fh.read(8)
      if len(raw) != 8:
        raise ValueError(f"{self.path}: not a safetensors file (shorter than its header)")
      (n,) = struct.unpack("<Q", raw)
      header = json.loads(fh.read(n))
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._header = header
    self._data_start = 8 + n
    self._fd: int | None = None

  def spec(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    info = self._header[name]
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return _DTYPES[info["dtype"]], tuple(info["shape"])

  def __getitem__(self, name: str) -> np.ndarray:
    dtype, shape = self.spec(name)
    begin, end = self._header[name]["data_offsets"]
    # pread into a fresh buffer rather than mmap: mapped pages would stay resident and
    # count against the process, breaking the one-copy memory bound of conversions.
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    out = np.empty(shape, dtype=dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos, total = 0, end - begin
    while pos < total:
      n = os.preadv(self._fd, [view[pos:]], self._data_start + begin + pos)
      if n <= 0:
        raise ValueError(f"{self.path}: truncated file while reading {name!r}")
      pos += n
    return out

  def __iter__(self) -> Iterator[str]:
    return iter(self._header)

  def __len__(self) -> int:
    return len(self._header)

  def close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.close()


class Checkpoint(Mapping[str, np.ndarray]):
  """A HF checkpoint: a folder with `model.safetensors` or shards + `*.index.json`, or one file.

  Tensors are read lazily, one at a time.
  """

  def __init__(self, path: str | os.PathLike):
    path = pathlib.Path(path)
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if path.is_file():
      self._add(path)
    elif (path / INDEX_NAME).exists() or list(path.glob("*.safetensors.index.json")):
      index_path = path / INDEX_NAME
      if not index_path.exists():
        index_path = sorted(path.glob("*.safetensors.index.json"))[0]
      weight_map = json.loads(index_path.read_text())["weight_map"]
      missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
      if missing:
        raise FileNotFoundError(f"{index_path} names shard files that are not there: {missing}")
      for name, fname in weight_map.items():
        shard = self._open(path / fname)
        if name not in shard:
          raise KeyError(f"{index_path} places {name!r} in {fname}, which lacks it")
        self._where[name] = str(path / fname)
    elif (path / SINGLE_NAME).exists():
      self._add(path / SINGLE_NAME)
    elif list(path.glob("*.safetensors")):
      for f in sorted(path.glob("*.safetensors")):
        self._add(f)
    else:
      raise FileNotFoundError(
          f"{path}: no safetensors checkpoint (expected {SINGLE_NAME}, {INDEX_NAME} + shards, "
          "or a .safetensors file). PyTorch .bin/.pth files: convert with "
          "`torch.load(path, weights_only=True)` and save as safetensors first.")

  def _open(self, f: pathlib.Path) -> SafetensorsFile:
    key = str(f)
    if key not in self._files:
      self._files[key] = SafetensorsFile(f)
    return self._files[key]

  def _add(self, f: pathlib.Path):
    shard = self._open(f)
    for name in shard:
      if name in self._where:
        raise ValueError(f"tensor {name!r} appears in both {self._where[name]} and {f}")
      self._where[name] = str(f)

  def spec(self, name: str):
    return self._files[self._where[name]].spec(name)

  def __getitem__(self, name: str) -> np.ndarray:
    return self._files[self._where[name]][name]

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)

  def close(self):
    for f in self._files.values():
      f.close()


def load_file(path) -> dict[str, np.ndarray]:
  f = SafetensorsFile(path)
  try:
    return {k: f[k] for k in f}
  finally:
    f.close()


def _header_for(items: list[tuple[str, np.ndarray]], metadata) -> bytes:
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, arr in items:
    dtype = np.dtype(arr.dtype)
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors equivalent")
    nbytes = arr.size * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes
  return struct.pack("<Q", len(raw)) + raw


def save_file(tensors: Mapping[str, np.ndarray], path, metadata: Mapping[str, str] | None = None):
  """Writes one safetensors file atomically (a temp file renamed into place)."""
  items = [(k, np.ascontiguousarray(v)) for k, v in tensors.items()]
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as fh:
    fh.write(_header_for(items, metadata))
    for _, arr in items:
      fh.write(arr.tobytes())
  os.replace(tmp, path)


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], directory,
                 max_shard_bytes: int = 5 * 2**30, metadata=None) -> list[str]:
  """Writes HF-style shards `model-0000i-of-0000n.safetensors` + the index, streaming.

  `tensors` may be a generator: at most one shard's worth of tensors is held at a time.
  Returns the shard file names.
  """
  metadata = dict(metadata or {"format": "pt"})
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  staged, pending, size, total = [], [], 0, 0

  def flush():
    nonlocal pending, size
    if pending:
      tmp_name = f"shard-{len(staged):05d}.safetensors.partial"
      save_file(dict(pending), directory / tmp_name, metadata)
      staged.append((tmp_name, [k for k, _ in pending]))
    pending, size = [], 0

  for name, arr in tensors:
    arr = np.asarray(arr)
    if pending and size + arr.nbytes > max_shard_bytes:
      flush()
    pending.append((name, arr))
    size += arr.nbytes
    total += arr.nbytes
  flush()
  n = len(staged)
  weight_map, names = {}, []
  for i, (tmp_name, keys) in enumerate(staged):
    final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.replace(directory / tmp_name, directory / final)
    names.append(final)
    weight_map.update({k: final for k in keys})
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = directory / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory / INDEX_NAME)
  return names
