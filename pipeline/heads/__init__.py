"""The head stage: linear heads on a cache. `protocol.run` selects C on validation, refits on
train+val and scores the test split once, with the rows in memory (`fitting`) or streamed from the
file (`stream`); `estimators` and `probe` are the heads themselves."""
