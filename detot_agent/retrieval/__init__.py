"""Retrieval: the encoder, the FAISS exemplar index (with MMR), the RAG retriever.

May import: `embedding/`, `softprompt/`, `io/`, `config`, `errors` (never `engines/`, `detot/`, `evaluation/`, `cli/`).
"""
