"""The feature stage: the extraction run. Samples (`pipeline.data`) through a frozen backbone
(`pipeline.backbones`) into a cache file: `extract` builds or resumes one file in one process,
`update` reuses the rows of unchanged images, `views` adds augmented train views, `distributed` runs
under torchrun, and `stage.run` chooses."""
