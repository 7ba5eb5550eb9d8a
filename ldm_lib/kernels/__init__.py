"""Triton kernels for the GPU path, each with a PyTorch reference and an autograd wrapper.

- ``flash_attention``: tiled attention with the online softmax (Dao et al. 2022), the attention
  backend ``"triton"`` of :mod:`ldm_lib.models.attention`
- ``groupnorm_silu``: GroupNorm followed by SiLU in one kernel, forward and backward, switched on by
  ``UNetConfig.fused_groupnorm_silu`` / ``model.fused_groupnorm_silu`` in a training config

Nothing is imported here: triton is imported only when a kernel is first used, so ``import ldm_lib``
works (and stays fast) where triton is missing. On a CPU the kernels run only in Triton's
interpreter, with ``TRITON_INTERPRET=1`` set before triton is imported.
"""
