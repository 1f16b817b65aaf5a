"""What a backbone is: a torchvision or timm model, its weights and preprocessing, resolved without
building it (`backbone.describe`, a `spec.BackboneSpec`) and built frozen (`backbone.build`); the
layer its feature is (`architectures`, `layers`); checkpoints (`checkpoints`); timm, the optional
extra (`timm_models`); the list of them all (`catalog`); and running one over a sample list
(`forward`: DataLoader workers, one forward pass per batch, rows into a sink)."""
