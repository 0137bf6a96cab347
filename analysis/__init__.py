"""analysis: population theory, theory-vs-simulation tables, the paper figures and their report.

- :mod:`analysis.theory` ``tr V``, ``tr(G V)/(2 beta)``, ``lam*`` for any scenario x g x M x prompts,
  built on :class:`vrpo.variance.VarianceParts` (the estimator's own sandwich algebra);
- :mod:`analysis.compare` the theory-vs-simulation table with 3-SE flags;
- :mod:`analysis.figures` the figure set F1-F6 from cached sweeps; :mod:`analysis.plots` plotting helpers;
- :mod:`analysis.report` ``paper_figures/REPORT.md``.
"""
