"""`chatrex-jax serve`: a web demo of UPN and ChatRex on the JAX pipeline (see `app`)."""
from chatrex_jax.serve.app import main

__all__ = ["main"]
