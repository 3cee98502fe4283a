"""Paths that may live in an object store (`gs://bucket/run`) as well as on local disk.

Every training path goes through `etils.epath` (what Orbax and Grain use): local paths behave
as before, `gs://` paths reach Cloud Storage through gcsfs (`pip install chatrex-jax[gcs]`) and
Orbax's arrays through TensorStore. Object stores have no rename and no append, so writers that
need either (`errors.atomic_path`, the metrics files) stage locally and upload whole objects,
each of which GCS replaces atomically.

Emulators and tests: `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (gcsfs, google-cloud-storage)
and `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` (Orbax's TensorStore) point both at a local
server such as `gcp-storage-emulator` (tests/test_object_store.py).
"""
from __future__ import annotations

import os
import re
from typing import Union

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
