"""rayquant.kernels."""
