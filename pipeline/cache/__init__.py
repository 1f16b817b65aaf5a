"""The cache stage: one self-describing HDF5 file per feature set (`schema`), written by `writer`,
read by `reader`. No torch here, so the head stage reads caches without importing it."""
