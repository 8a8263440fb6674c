"""Comparison reports from run records and Optuna studies: collect (plain data), stats, plots, build
(Markdown, self-contained HTML, figures, report.json). Imports neither torch nor Lightning."""
