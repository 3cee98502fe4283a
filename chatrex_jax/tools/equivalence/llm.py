"""Runner for the `qwen2_lm` fixture: forward logits/hidden states and greedy generation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.inference.generate import SamplingConfig, generate
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register


@register("qwen2_lm")
def run_qwen2_lm(fx: Fixture) -> RunResult:
  config = LLMConfig.from_hf(dict(fx.config["qwen2_config"], model_type="qwen2"))
  model = CausalLM(config)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = llm_convert.to_flax(fx.weights(), config, expected=expected)
  x = fx.inputs
  out = model.apply({"params": params}, jnp.asarray(x["input_ids"]),
                    positions=jnp.asarray(x["position_ids"]),
                    key_valid=jnp.asarray(x["attention_mask"]).astype(bool), return_hidden_states=True)
  n = int(fx.config["max_new_tokens"])
  sampling = SamplingConfig(max_new_tokens=n, return_logits=True)  # no EOS stop, as the fixture
  gen = generate(model, params, input_ids=x["gen_input_ids"], attention_mask=x["gen_attention_mask"],
                 sampling=sampling)
  genb = generate(model, params, input_ids=x["genb_input_ids"], attention_mask=x["genb_attention_mask"],
                  sampling=sampling)
  return RunResult(outputs={
      "logits": np.asarray(out["logits"]),
      "hidden_states": np.stack([np.asarray(h) for h in out["hidden_states"]]),
      "gen_tokens": gen.tokens.astype(np.int64), "gen_step_logits": gen.step_logits,
      "genb_tokens": genb.tokens.astype(np.int64), "genb_step_logits": genb.step_logits,
  })
