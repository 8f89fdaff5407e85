"""The Ray Data graph (graph.py) and its Ray-free steps (images.py: read/decode/validate)."""
