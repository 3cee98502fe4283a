"""A real Cloud Storage JSON API on a loopback port, for the `gs://` tests.

`serve()` runs `gcp-storage-emulator` (PyPI) in a subprocess and yields the environment that
points the clients at it: STORAGE_EMULATOR_HOST (gcsfs through `etils.epath`,
google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL (Orbax's TensorStore).

Two differences from Cloud Storage are corrected here, before the emulator's routes are built
(a third, the missing Storage Control API, is avoided by the environment `serve` yields):
- downloads carry no `x-goog-generation` header. Cloud Storage always sends it, and TensorStore
  rejects a read without it ("Malformed StorageGeneration"), which is what stopped every Orbax
  OCDBT checkpoint (its manifest is read back while saving) against the plain emulator;
- the emulator serves one request at a time (`http.server.HTTPServer`), while TensorStore and
  gcsfs keep requests in flight from several threads; the standard library's threading server
  serves them concurrently.
Run as a script, this file is the patched emulator's command line (`start --port=...`).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator


def _patch_and_run() -> int:
  import http.server
  http.server.HTTPServer = http.server.ThreadingHTTPServer
  from gcp_storage_emulator.handlers import objects

  plain_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    try:
      meta = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (a missing object: the handler's 404)
      meta = None
    if meta is not None:
      response["x-goog-generation"] = str(meta["generation"])
      response["x-goog-metageneration"] = str(meta.get("metageneration", "1"))
    return plain_download(request, response, storage, *args, **kwargs)

  objects.download = download
  from gcp_storage_emulator.__main__ import main  # builds its routes from `objects` now
  return main()


@contextlib.contextmanager
def serve(bucket: str, port: int, *, set_environ: bool = True) -> Iterator[dict]:
  """Runs the emulator with `bucket` created; yields (and, by default, sets) its environment."""
  # The emulator logs every request: into a file, since a pipe nobody drains fills up and
  # blocks the server mid-request.
  log = tempfile.TemporaryFile("w+")
  server = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1", f"--port={port}",
       "--in-memory", f"--default-bucket={bucket}"],
      stdout=log, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          server.kill()
          log.seek(0)
          raise RuntimeError(f"gcp-storage-emulator did not start: {log.read()}") from None
        time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "test",
           # gcsfs >= 2026 first asks the Storage Control gRPC API for the bucket's layout,
           # which the emulator does not serve; google-auth would meanwhile probe for a GCE
           # metadata server, blocking gcsfs's event loop (and an async Orbax save) for minutes.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}
    saved = {k: os.environ.get(k) for k in env}
    if set_environ:
      os.environ.update(env)
    try:
      yield env
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  finally:
    server.terminate()
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()
    log.close()


if __name__ == "__main__":
  sys.exit(_patch_and_run())
