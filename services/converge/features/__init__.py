"""The feature package: one definition of every feature from event to model
input, shared by the interactions service (live states), training (point in
time) and scoring. It imports no service's internals, and no service's
internals import each other through it."""
