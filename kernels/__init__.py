"""Triton kernels of rpp_triton, installed as `rpp_triton.kernels`.

Each file holds one op in four parts: `<op>_ref` (PyTorch, the CPU fallback and test oracle),
`_<op>_kernel` (Triton), `<op>` (the launcher) and, where autograd needs it, `<Op>Function`.
`bsmm.py` also registers `torch.ops.rpp_triton.bsmm` (CPU, CUDA and fake implementations), the
form that `torch.compile` traces; importing `rpp_triton.kernels.bsmm` registers it.
"""
