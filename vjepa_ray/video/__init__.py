"""Video: PyAV clip decoding, the recipe's clip sampling, uint8 transforms, synthetic test videos."""
