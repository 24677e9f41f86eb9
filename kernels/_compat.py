"""Triton import that degrades cleanly: without Triton installed, kernels still define (and the
`_ref` fallbacks still work); only launching one raises."""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _Missing:
        constexpr = int

        def __getattr__(self, name):
            return _Missing()

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _unavailable(args[0])
            return lambda fn: _unavailable(fn)

    def _unavailable(fn):
        class _Kernel:
            def __getitem__(self, grid):
                raise RuntimeError(f"{fn.__name__} needs Triton: pip install 'rpp_triton[triton]'")

        return _Kernel()

    triton = _Missing()
    tl = _Missing()

__all__ = ["HAS_TRITON", "triton", "tl"]
