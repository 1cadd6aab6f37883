"""daqkd: Data-Augmented Quantization-Aware Knowledge Distillation (Kur & Zhao, arXiv 2509.03850)."""

__version__ = "0.1.0"
