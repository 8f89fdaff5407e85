"""Training a small SAM model on synthetic and annotated data."""
