"""Evaluation: refusal judging, baselines, suites (safety, truthfulqa, utility), reports."""
