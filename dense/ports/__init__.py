"""Readable PyTorch ports of models first published for other runtimes (ncnn, TFLite, ...)."""
