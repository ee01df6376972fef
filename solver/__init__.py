"""rayquant.solver."""
