"""Datasets: record kinds, JSONL import, tfds array_record builders and grain batch loaders."""
