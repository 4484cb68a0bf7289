"""Converge's models: training frames and time splits, LightGBM training with
calibrated probabilities, evaluation, the rule-based fallback, and the MLflow
registry with `champion` / `challenger` aliases.

Modules, in the order of the lifecycle:

- `dataset`: `TrainingFrame` (one labelled example per row) and the splits.
- `training`: `TrainingConfig`, `train`, the bounded `search`, the minimums
  below which a prediction does not train (`InsufficientData`).
- `native`: the trained model's serving half (booster, calibrator,
  categorical levels), shared by training, MLflow's pyfunc and the scoring
  service.
- `evaluation`: test-period metrics and plots.
- `fallback`: documented rules that answer while no model can be trained.
- `registry`: MLflow runs, registered models, promotion gates, aliases and
  their history, rollback, loading the champion.
- `cli`: `converge models ...`.

Importing this package is cheap: MLflow and LightGBM load with the modules
that need them.
"""
