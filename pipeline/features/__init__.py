"""The feature stage: images (`sources`, `datasets`, `samples`, `images`) through a frozen backbone
(`backbone`) into a cache file (`extract` in one process, `distributed` under torchrun; `run`
chooses)."""
