"""Evaluation: policies (true utility, proxy reward, win rates, KL), the over-optimisation sweep, the bias audit."""
