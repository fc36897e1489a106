"""Per-sample gradient statistics from module hooks, shared by NoiseScale and BatchSNR.

One module per job: :mod:`.engine` (hooks, rule table, sums), one per layer rule
(:mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.norm`, :mod:`.attention`) and the
:mod:`.func` fallback.

A forward hook on each covered module keeps references to its inputs and registers a tensor
hook on its outputs for the gradient flowing back into them; a hook on each parameter
(``Tensor.register_hook`` on a leaf runs once per backward, with the summed incoming
gradient, just before it is accumulated into ``.grad``) then turns activations and output
gradients into per-sample statistics of that parameter's gradient contribution ``c_s``:

* ``sq``: Σ_s ‖c_s‖² (and, with ``keep_last``, the per-sample vector of the last backward);
* ``elem`` (with ``need_elem``): Σ_s c_s² elementwise, shaped like the parameter.

Rules (all exact up to rounding; "materialise" means per-sample gradients of that one
parameter, shape ``(B, *p.shape)``, exist for a moment):

* ``nn.Linear`` on ``(B, in)``: ‖c_s‖² = ‖g_s‖²‖a_s‖² (Goodfellow's trick); elementwise
  Σ_s c_s² = (g²)ᵀ(a²). Nothing per-sample is materialised.
* ``nn.Linear`` on sequences ``(B, …, in)``: c_s = Σ_t g_st a_stᵀ. Norms by the Gram trick
  ‖c_s‖² = Σ_{t,u} (a_t·a_u)(g_t·g_u) when ``T(in+out) ≤ in·out``, else materialised;
  elementwise sums materialise.
* ``nn.Conv1d``/``2d``/``3d`` (any groups, stride, dilation, padding and padding mode):
  per-sample gradients materialised by one convolution backward with the batch folded into
  the groups (``B·groups`` groups) or, for ``groups=1`` 1-d/2-d layers, as a sequence Linear
  over the unfolded input (``F.unfold``, positions as the sequence), whose Gram trick gives
  the norms without materialising when there are few positions and many channels.
* ``nn.Embedding``: ‖c_s‖² = Σ_{t,u} [x_t = x_u] g_t·g_u (Gram with a token-equality mask);
  elementwise sums from the per-(sample, token) sums of g over the pairs that occur (sorted,
  ``(B·T, d)`` buffers), never ``(B, V, d)`` (except for a weight shared with another module,
  whose per-sample gradients are materialised and summed). ``padding_idx`` rows get no
  gradient, as in torch. ``scale_grad_by_freq`` and ``max_norm`` go to the fallback.
* Hugging Face's ``Conv1D`` (GPT-2; ``y = x W + b`` with ``W`` of shape ``(in, out)``): the
  ``nn.Linear`` rules with the weight transposed.
* ``nn.LayerNorm``, ``nn.RMSNorm``: c_s(weight) = Σ_t g_t ⊙ x̂_t, c_s(bias) = Σ_t g_t,
  materialised (small).
* ``nn.MultiheadAttention`` (packed in-projection, no ``bias_k``/``bias_v`` or
  ``add_zero_attn``, no attention dropout while training; any masks, ``is_causal``,
  ``batch_first`` either way; mode ``"auto"`` only, since it re-runs the attention): the
  attention recomputed once for the batch from the recorded inputs gives the gradients of the
  projected queries, keys and values; the in- and out-projections are then sequence Linears.
  It costs about one more forward and backward of the attention block (vs. ``vmap`` of it).
* any other module owning parameters (and other ``nn.MultiheadAttention`` forms, as a whole,
  since it reads ``out_proj``'s weights without calling it): ``torch.func`` fallback, ``vmap`` over
  ``vjp`` of the module re-run on each sample with its recorded output gradient. Exact for
  modules that treat samples independently and draw no random numbers (dropout ``p=0`` or
  eval); tensor arguments whose first dimension is the batch size are split per sample.

A module called several times between two backward passes (weight sharing, recurrence)
has its uses joined along the sequence axis, which is exact: the per-sample gradient is the
sum over uses. A parameter shared by several modules (tied embeddings) has its per-sample
gradients materialised by each module and summed. Batch norm makes per-sample gradients
undefined and is not supported. The batch is dimension 0 of every activation (the attention
rule also reads ``batch_first=False``; the ``torch.func`` fallback needs dimension 0 and leaves a
sequence-first attention out, with a warning).
"""

from sgdlens.lenses.per_sample._common import MODES, index_sums
from sgdlens.lenses.per_sample.engine import Disarm, PerSampleEngine, eager, shared_engine

__all__ = ["MODES", "Disarm", "PerSampleEngine", "eager", "index_sums", "shared_engine"]
