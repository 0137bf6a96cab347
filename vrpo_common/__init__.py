"""Neutral helpers importable by every package (``vrpo``, ``sim``, ``analysis``, ``llm``).

- :mod:`vrpo_common.fileio`: atomic writes (text, JSON, figures, torch objects) and
  the one JSON encoder for NumPy scalars/arrays and paths.
- :mod:`vrpo_common.stats`: Monte Carlo statistics (mean/SE/CI, ``tr Cov`` and its SE,
  paired ratios with delta-method SE, ``Z95``).

Standard library and NumPy only; nothing here imports the suite's other packages.
"""
