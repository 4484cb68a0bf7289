"""The feature package: one definition of every feature from event to model
input, shared by the interactions service (live states), training (point in
time) and scoring. It imports no service's internals, and no service's
internals import each other through it.

- `definitions.py`: what a feature is (`FeatureDefinition`), the built-in set,
  the engine's view of an interaction (`Event`);
- `engine.py`: `FeatureSet`, which folds interactions into a `CustomerState`
  and reads customer and ticket features from it, live or at cutoffs;
- `config.py`: `load_feature_set`, a feature set from YAML (`sets/` holds
  the shipped ones to copy);
- `transform.py`: features plus profile into a model's input vector.
"""
