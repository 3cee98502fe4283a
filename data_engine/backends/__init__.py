"""Pluggable model backends (see base.py): transformers implementations (hf.py) and the
synthetic-scenes oracles (oracle.py)."""
from data_engine.backends.base import (  # noqa: F401
                                       Backend,
                                       GroundingBackend,
                                       VerifierBackend,
                                       VisionLanguageBackend,
                                       build,
                                       clear_cache,
)

__all__ = ["Backend", "GroundingBackend", "VerifierBackend", "VisionLanguageBackend", "build",
           "clear_cache"]
