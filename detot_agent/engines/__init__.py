"""Engines: the engine contract (`base.py`), the torch engine, generation, batching, model loading, vLLM.

May import: `softprompt/`, `io/`, `config`, `errors` (never `retrieval/`, `detot/`, `evaluation/`, `cli/`).
"""
