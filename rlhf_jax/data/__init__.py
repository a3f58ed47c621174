"""Datasets: record kinds, JSONL import, tfds array_record builders, grain batch loaders, and the
data sources that build them on first use."""
