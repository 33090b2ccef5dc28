"""Graphs: kNN / mutual-kNN (faiss + scipy.sparse), flow diffusion, random walks (COUPLE issue)."""
