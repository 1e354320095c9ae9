"""mixllm: embedding-token fusion of images, items and user histories into a language model."""

__version__ = "0.1.0"
