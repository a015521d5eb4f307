"""Text to token ids and back: GPT-2's BPE (bpe.py) and the tokenizers npgpt train uses behind one interface, with their files (tokenizers.py)."""
