"""insect: fine-tune torchvision classifiers with Ray Train, classify image sets with Ray Data."""

__version__ = "0.1.0"
