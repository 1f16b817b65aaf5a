"""Where images come from: image folders, CSV manifests, WebDataset tar shards (`shards`) and
torchvision datasets (`datasets`), listed as one canonical `SampleList` of (id, label, split) rows
with each file's identity (`samples`, `sources`), and decoded to 8-bit RGB (`images`). No model
here."""
