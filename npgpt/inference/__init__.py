"""Running a trained model: the KV cache (kvcache.py), sampling (sampling.py), decoding and streaming (decode.py), and 16- and 8-bit packed weights (quant.py)."""
