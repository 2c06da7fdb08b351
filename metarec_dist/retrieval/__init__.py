"""Retrieval: exact and approximate top-k search over item vectors (own exact searcher, FAISS indexes)."""
