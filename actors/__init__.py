"""The pipeline's workers: thin callable classes (and one function) that map a batch dict
to a batch dict. Each loads what it needs once in `__init__`; the math lives in `amg/`,
`model/` and `dataset/`. `pipeline/graph.py` declares their resources."""
