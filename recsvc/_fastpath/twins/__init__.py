"""Plain-numpy twins of the compiled kernels, one module per kernel module."""
