"""Data-quality reports of dataset versions: one self-contained HTML page per version
(`write_report`), computed with pyarrow a row group at a time (`stats`), with matplotlib
figures (`figures`) and the data engine's per-round metrics (`sources.write_round_metrics`).
Live metrics of a running pipeline are in `actors.metrics`."""
from .report import build_report, write_report
from .sources import write_round_metrics

__all__ = ["build_report", "write_report", "write_round_metrics"]
