"""Golden-fixture runners, one module per component family.

Every module in this package registers its runners with `@register("component")`
(`component` is the `meta.json` field). `runners()` imports them all, so adding a component
means adding a module here; nothing else needs editing.
"""
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register, runners

__all__ = ["Fixture", "RunResult", "register", "runners"]
