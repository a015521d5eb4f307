"""Logits of bf16 / int8 npgpt against float32 on random GPT-2 124M weights (32 decode steps after a
32-token prefill), and the weights' resident bytes.   python examples/quant_quality.py"""
import numpy as np, npgpt
from npgpt.inference import quant
from npgpt.inference.kvcache import KVCache
cfg = npgpt.GPTConfig.from_preset("gpt2")
idx = np.random.default_rng(0).integers(0, cfg.n_vocab, (1, 64))
ref_model = npgpt.GPT(cfg, seed=0).eval()
rc = KVCache.for_model(ref_model, 1); ref_model.forward_cached(idx[:, :32], rc)
ref = np.concatenate([ref_model.forward_cached(idx[:, t:t+1], rc) for t in range(32, 64)])
fpb = quant.weight_bytes(ref_model); del ref_model
print(f"fp32 weight bytes {fpb}")
for kind in ["bf16", "int8"]:
    m = quant.quantize(npgpt.GPT(cfg, seed=0), kind)
    c = KVCache.for_model(m, 1); m.forward_cached(idx[:, :32], c)
    out = np.concatenate([m.forward_cached(idx[:, t:t+1], c) for t in range(32, 64)])
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    agree = (out.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{kind}: logits rel. error (Frobenius, 32 decode steps after a 32-token prefill) {rel:.2e}; "
          f"max abs err / max abs logit {np.abs(out-ref).max()/np.abs(ref).max():.2e}; argmax agreement {agree:.2f}; "
          f"weight bytes {quant.weight_bytes(m)} ({fpb/quant.weight_bytes(m):.2f}x smaller)")
