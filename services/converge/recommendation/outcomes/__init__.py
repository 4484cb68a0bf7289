"""Outcomes of decisions, control groups and the measured lift of each action."""
