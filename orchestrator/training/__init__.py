"""Training: Dask cluster backends, and the train/evaluate tasks run on workers."""
