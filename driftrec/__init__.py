"""driftrec: a streaming, real-time recommender around a LoRA-tuned language-model scorer."""

__version__ = "0.1.0"
