"""The task embedding: a task's one learnable state, driving both retrieval and the soft prompt.

`task_embedding.py` holds the object (query side `q(x)` + soft-prompt head `P(x)`, one version,
one artefact), `head.py` the soft-prompt head, `update.py` the one `update` that trains it.

May import: `softprompt/`, `io/`, `config`, `errors` (engines are passed in, never imported).
"""
