"""Activations on disk: the content-keyed Parquet cache (`cache`), filling it from a model
(`extract`), shuffled training batches from it (`loader`), and known-answer data (`synthetic`)."""
