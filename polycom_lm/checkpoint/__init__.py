"""Checkpoints: writing and reading model / optimizer state (`dcp.py`, DeepSpeed behind the engines),
reading checkpoints safely (`safe_load.py`), and turning any checkpoint into one state dict
(`consolidate.py`)."""
