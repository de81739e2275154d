"""Data: image datasets (built-ins, folders, the Hub), the bundled sample data, label handling, and the per-sample
transforms and augmentation of the training recipes (torchvision v2, timm)."""
