"""Evaluation: metrics from float64 log-probabilities (`metrics`), plots and tables (`report`), and
comparisons across result folders with paired tests (`compare`)."""
