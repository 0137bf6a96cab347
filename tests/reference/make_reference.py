"""Regenerate the stored reference numbers with independent implementations.

    python tests/reference/make_reference.py

statsmodels_logit_hc0.json: statsmodels Logit without intercept, Newton, cov_type="HC0"
(the robust sandwich H^-1 (sum s_i s_i^T) H^-1), on a seeded data set.
"""

import json
from pathlib import Path

import numpy as np
import statsmodels
import statsmodels.api as sm

rng = np.random.default_rng(20261128)
X = rng.normal(size=(60, 3))
p = 1 / (1 + np.exp(-(X @ np.array([0.8, -0.4, 0.3]) + 0.6 * np.sin(2 * X[:, 0]))))
Z = (rng.random(60) < p).astype(float)
fit = sm.Logit(Z, X).fit(disp=0, cov_type="HC0", method="newton", tol=1e-14, maxiter=100)
out = {
    "source": f"statsmodels {statsmodels.__version__} Logit(Z, X).fit(cov_type='HC0', method='newton')",
    "X": X.tolist(),
    "Z": Z.tolist(),
    "params": fit.params.tolist(),
    "cov_hc0": fit.cov_params().tolist(),
}
(Path(__file__).parent / "statsmodels_logit_hc0.json").write_text(json.dumps(out, indent=1))
