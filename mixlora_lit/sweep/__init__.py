"""Optuna sweeps over `mixlora-lit fit`: the sweep file (`spec`), trials and studies (`driver`), and
the step-keyed pruning callback a trial's fit process adds (`pruning`)."""
