"""Flax Linen modules (no I/O).

Einsum letters, used in every module of this package:
  B batch            T query length       S key/value length
  D model width      N query heads        K key/value heads     G query heads per kv head
  H head dim         F MLP width          V vocabulary
  L levels           Q queries (UPN)      P sampling points     C channels
  X, Y spatial width / height             O objects (boxes)

Logical axis names (mapped to mesh axes by the rules in the config):
  params:       embed, mlp, heads, kv_heads, head_dim, vocab, layers, conv_in, conv_out, norm
  activations:  activation_batch, activation_length, activation_embed, activation_heads,
                activation_kv_heads, activation_mlp, activation_vocab
"""
