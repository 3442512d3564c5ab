"""cifarcnn: train, evaluate, benchmark and serve CNN classifiers on CIFAR-10."""

from .errors import CifarError
from .inference import Classifier, load

__all__ = ["CifarError", "Classifier", "load"]
__version__ = "0.1.0"
