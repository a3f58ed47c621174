"""Datasets: record kinds, JSONL import, tfds array_record builders, batch loaders, and the
data sources that build them on first use."""
