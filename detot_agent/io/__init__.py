"""Input and output: atomic persistence and manifests, data-file readers, record types, the JSONL log.

May import: `answers`, `config`, `errors` only.
"""
