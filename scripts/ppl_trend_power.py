"""Power of ppl-trend's pooled correlation: how many trajectories and checkpoints it needs.

Fisher z of a Spearman correlation over n pairs has standard error about sqrt(1.06 / (n - 3));
pooling T trajectories of m pairs each by Fisher z (weights m - 3) gives an effective size of
T (m - 3). Detecting rho = 0.3 with 80% power at alpha = 0.05 two-sided needs
((z_0.975 + z_0.8) / atanh 0.3)^2 * 1.06 + 3, about 90 pairs in one series. The simulation draws
bivariate normal pairs with correlation rho and counts how often the pooled test rejects.

Run: python scripts/ppl_trend_power.py [--reps 2000]
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from neuronbench.harness.engine.pooled import spearman_rows


def analytic_power(trajectories: int, pairs: int, rho: float = 0.3, alpha: float = 0.05) -> float:
    z = stats.norm.ppf(1 - alpha / 2)
    effective = trajectories * (pairs - 3)
    return float(1 - stats.norm.cdf(z - np.arctanh(rho) * np.sqrt(effective / 1.06)))


def simulated_power(trajectories: int, pairs: int, rho: float = 0.3, alpha: float = 0.05,
                    reps: int = 2000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    z = stats.norm.ppf(1 - alpha / 2)
    x = rng.standard_normal((reps, trajectories, pairs))
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal(x.shape)
    r = spearman_rows(x.reshape(-1, pairs), y.reshape(-1, pairs)).reshape(reps, trajectories)
    pooled = np.arctanh(r).mean(1)  # equal weights: every trajectory has the same pairs
    return float(np.mean(np.abs(pooled) / np.sqrt(1.06 / (trajectories * (pairs - 3))) > z))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2000)
    args = p.parse_args()
    need = ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / np.arctanh(0.3)) ** 2 * 1.06 + 3
    print(f"pairs needed in one series for 80% power at rho = 0.3: {need:.1f}")
    print("trajectories  pairs each  pairs  analytic  simulated")
    for t, m in ((1, 9), (4, 19), (6, 19), (8, 19), (8, 12)):
        print(f"{t:>12}  {m:>10}  {t * m:>5}  {analytic_power(t, m):>8.3f}  {simulated_power(t, m, reps=args.reps):>9.3f}")


if __name__ == "__main__":
    main()
