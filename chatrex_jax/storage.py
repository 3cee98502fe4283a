"""Paths that may live in an object store (`gs://bucket/run`) as well as on local disk.

Every training path goes through `etils.epath` (what Orbax and Grain use): local paths behave
as before, `gs://` paths reach Cloud Storage through gcsfs (`pip install chatrex-jax[gcs]`) and
Orbax's arrays through TensorStore. Object stores have no rename and no append, so writers that
need either (`errors.atomic_path`, the metrics files) stage locally and upload whole objects,
each of which GCS replaces atomically. Readers and writers that only work on local files get a
local copy: `cached_copy` (a per-machine mirror of a remote dataset or tokenizer folder),
`local_input` / `local_output` (a temporary download; an upload only on success) and
`staging_dir` (a resumable local stand-in for a remote output folder).

Emulators and tests: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (gcsfs, google-cloud-storage)
and `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` (Orbax's TensorStore) point both at a local
server such as `gcp-storage-emulator` (tests/test_object_store.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def path(p: PathLike) -> epath.Path:
  """An `epath.Path`; local paths are made absolute (Orbax needs absolute directories)."""
  out = epath.Path(p)
  return out if is_remote(p) else epath.Path(os.path.abspath(os.fspath(out)))


def is_remote(p: PathLike) -> bool:
  """True for URLs with a scheme (gs://, s3://, ...), False for local paths."""
  return bool(_SCHEME.match(os.fspath(p)))


# Libraries that read or write through the local filesystem only (safetensors' mmap, PIL,
# ArrayRecord's C++ files, the tokenizers) get a local copy; these helpers make one for a
# remote path and pass a local path through untouched.

_CHUNK = 16 * 2**20


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Streams one file between any two paths (local or remote), in 16 MiB chunks."""
  src, dst = path(src), path(dst)
  if not is_remote(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open("rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, _CHUNK)


def files_under(p: PathLike) -> list[str]:
  """Relative paths of every file below the folder `p`, sorted (`rglob` is not available for
  object stores through etils: it refuses `**` patterns)."""
  root = path(p)
  out, todo = [], [root]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        out.append(os.path.relpath(os.fspath(child), os.fspath(root)))
  return sorted(out)


def _lists_others(rel: str) -> bool:
  """Files that name other files (a shard index, a manifest): copied last, so that a reader who
  finds one also finds everything it lists, even if the copy is interrupted."""
  name = os.path.basename(rel)
  return name.endswith(".index.json") or name.startswith("manifest")


def copy_tree(src: PathLike, dst: PathLike, exclude: tuple[str, ...] = ()) -> list[str]:
  """Copies a file, or a folder's files recursively (indexes and manifests last, top-level
  entries named in `exclude` left out); returns the relative paths copied."""
  src, dst = path(src), path(dst)
  if src.is_file():
    copy_file(src, dst)
    return [src.name]
  files = [rel for rel in files_under(src) if rel.split(os.sep, 1)[0] not in exclude]
  files.sort(key=lambda rel: (_lists_others(rel), rel))
  for rel in files:
    copy_file(src / rel, dst / rel)
  return files


@contextlib.contextmanager
def local_input(p: PathLike) -> Iterator[str]:
  """`p` itself when local; for a remote `p`, a temporary local copy of the file or folder.

  FileNotFoundError when the remote path does not exist. The copy is removed afterwards.
  """
  if not is_remote(p):
    yield os.fspath(p)
    return
  remote = path(p)
  if not remote.exists():
    raise FileNotFoundError(f"{p} does not exist")
  with tempfile.TemporaryDirectory(prefix="chatrex-in-") as tmp:
    local = os.path.join(tmp, remote.name or "object")
    copy_tree(remote, local)
    yield local


def upload_tree(local: PathLike, remote: PathLike, *, exclude: tuple[str, ...] = (),
                replace: bool = False) -> list[str]:
  """`copy_tree(local, remote, exclude)`; with `replace`, files under `remote` that the copy did
  not write are removed afterwards. Returns the relative paths copied."""
  uploaded = copy_tree(local, remote, exclude)
  if replace:
    kept = set(uploaded)
    for rel in files_under(remote):
      if rel not in kept:
        (path(remote) / rel).unlink()
  return uploaded


def exists_nonempty(p: PathLike) -> bool:
  """True when `p` is a file, or a folder holding at least one file."""
  p = path(p)
  if p.is_dir():
    return bool(files_under(p))
  return p.exists()


@contextlib.contextmanager
def local_output(p: PathLike, *, replace: bool = False) -> Iterator[str]:
  """`p` itself when local; for a remote `p`, a local staging path uploaded there on success.

  The block writes a file or a folder at the yielded path; when it finishes without an error,
  it is uploaded to `p` (`copy_tree`: shard indexes and manifests last) and, with `replace`,
  files under `p` that the upload did not write are then removed (stale shards of an earlier
  version). On an error nothing is uploaded and the remote path is left as it was.
  """
  if not is_remote(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="chatrex-out-") as tmp:
    local = os.path.join(tmp, path(p).name or "object")
    yield local
    if not os.path.exists(local):
      return
    remote = path(p)
    if os.path.isfile(local):
      copy_file(local, remote)
      return
    upload_tree(local, remote, replace=replace)


def cache_root() -> str:
  """Where remote inputs are cached and remote outputs staged: $CHATREX_CACHE, else
  ~/.cache/chatrex-jax."""
  return os.environ.get("CHATREX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "chatrex-jax")


def _cache_key(p: PathLike) -> str:
  url = os.fspath(p).rstrip("/")
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", url)[-80:]
  return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def staging_dir(p: PathLike) -> str:
  """A local folder that stands for the remote folder `p` across runs (the same URL, the same
  folder), for writers that resume from their own files before uploading."""
  local = os.path.join(cache_root(), "staging", _cache_key(p))
  os.makedirs(local, exist_ok=True)
  return local


def cached_copy(p: PathLike) -> str:
  """`p` itself when local; for a remote folder, a local mirror of its files under
  `cache_root()/mirror/`, refreshed file by file (a file whose size or modification time
  changed is downloaded again), so a second reader of the same data downloads nothing."""
  if not is_remote(p):
    return os.fspath(p)
  remote = path(p)
  if not remote.is_dir():
    raise FileNotFoundError(f"{p} is not a folder in the object store")
  local = os.path.join(cache_root(), "mirror", _cache_key(p))
  os.makedirs(local, exist_ok=True)
  index_path = os.path.join(local, ".mirror.json")
  index = {}
  if os.path.exists(index_path):
    with open(index_path) as f:
      index = json.load(f)
  for rel in files_under(remote):
    f = remote / rel
    st = f.stat()
    dst = os.path.join(local, rel)
    if index.get(rel) != [st.length, st.mtime] or not os.path.exists(dst):
      with tempfile.TemporaryDirectory(dir=local) as tmp:
        part = os.path.join(tmp, "part")
        copy_file(f, part)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(part, dst)   # a killed download never leaves a short file under its name
      index[rel] = [st.length, st.mtime]
      tmp_index = f"{index_path}.{os.getpid()}.tmp"
      with open(tmp_index, "w") as out:
        json.dump(index, out)
      os.replace(tmp_index, index_path)
  return local
