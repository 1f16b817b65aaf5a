"""The head stage: heads trained on a cache.

`protocol.run` chooses a head's setting on validation, refits on train+val and scores the test
split once. The rows are held in memory (`fitting`) or streamed from the file (`stream`). What is
trained is a head kind (`kinds`: torch, logreg, knn, ncm, mlp, each one module), and what comes out
is one `TrainedHead` (`trained`), which saves, loads, predicts and exports alike for every kind.
"""
