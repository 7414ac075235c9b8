"""Retrieval: the encoder, the task embedding's query side, the FAISS exemplar index (with MMR), the RAG retriever.

May import: `io/`, `config`, `errors` (never `engines/`, `detot/`, `evaluation/`, `cli/`).
"""
