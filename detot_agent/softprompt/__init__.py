"""Soft prompts: the artefact and its initialisation, the serving registry, training, PEFT interchange.

May import: `io/`, `config`, `errors` (engines are passed in, never imported).
"""
