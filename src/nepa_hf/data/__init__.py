"""Data: image datasets (built-ins, folders, the Hub) and image decoding, the bundled sample data, label handling, the
pretraining data pipeline (`pretraining`), and the per-sample transforms and augmentation of the training recipes
(torchvision v2, timm)."""
