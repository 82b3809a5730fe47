"""Model card templates rendered by `sparsemem export`."""
