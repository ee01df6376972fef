"""rayquant.workers."""
