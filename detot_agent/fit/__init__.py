"""Fitting DETOT to a user's task: `DETOTFit` (a DSPy optimizer) and what `detot fit` runs.

`config.py` (`FitConfig`, `Choice`), `configure.py` (a choice applied to a DETOT copy), `distill.py` (the model's
own accepted chains, and the gold rationales, as training items), `race.py` (racing the candidates on the valset,
and the guard against plain voting), `report.py` (the fit folder), `optimizer.py` (`DETOTFit`).
"""
