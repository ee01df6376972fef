"""rayquant.jobs."""
