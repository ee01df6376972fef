"""rayquant.storage."""
