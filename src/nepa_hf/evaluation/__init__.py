"""Evaluation: frozen features (k-NN, linear probe), classifier accuracy, local `evaluate` metric modules,
segmentation inference, and attention / similarity / PCA visualisations."""
