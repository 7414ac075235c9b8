"""DETOT itself: task analysis, voting, the monitor, the controller, the `DETOT` module, its sampling loop, adapters.

May import: `engines/`, `retrieval/`, `softprompt/`, `io/`, `answers`, `config`, `errors` (never `evaluation/`, `cli/`).
"""
