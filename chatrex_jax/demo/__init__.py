"""`chatrex-jax demo`: the whole system learning end to end on embedded synthetic scenes.

data engine -> tiny UPN -> proposals -> tiny ChatRex (stages 1-3) -> held-out evaluation ->
report. `chatrex_jax.demo.run.main` is the command; `evaluate` and `report` hold the held-out
protocol and the written outputs.
"""
from chatrex_jax.demo.run import main

__all__ = ["main"]
