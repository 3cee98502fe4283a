"""ChatRex in JAX/Flax: perception (UPN proposals, object tokens) decoupled from understanding (LLM)."""

__version__ = "0.1.0"
