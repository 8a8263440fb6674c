"""Evaluation outside training: lm-eval-harness and the paper's label-token accuracy (no Lightning)."""
