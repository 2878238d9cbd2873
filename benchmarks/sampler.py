"""Rollout throughput: vrl_jax's compiled sampler vs transformers `generate`, same model, same run.

  python benchmarks/sampler.py [--batch 32] [--prompt 64] [--new 128] [--repeats 3]

A randomly initialised Qwen2.5-VL-shaped model of ~3.7 M parameters (text hidden 256, 4 layers,
vocabulary 1024; performance.md's peer figure is ~455 tokens/s for transformers on 2 cores),
text-only prompts, sampling at temperature 1 with top-k and top-p off on both sides. Both see the
same weights. Compilation is timed separately; steady state is the median of the repeats. The last
line is the ratio vrl_jax tokens/s / transformers tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from common import build_checkpoint, matmul_flops_per_s  # benchmarks/common.py


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch

    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.positions import text_positions
    from vrl_jax.models.processor import ModelInputs
    from vrl_jax.models.weights import load_hf_params
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig

    torch.set_num_threads(os.cpu_count() or 1)
    stop = 1023
    with tempfile.TemporaryDirectory() as d:
        hf = build_checkpoint(d)
        config = ModelConfig.from_pretrained(d)
        model = load_hf_params(d, config)
    n_params = sum(p.numel() for p in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()

    rs = np.random.RandomState(0)
    ids = rs.randint(0, 1000, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    positions, next_position = text_positions(mask)
    inputs = ModelInputs(ids, mask, positions, next_position, None)

    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=args.new, stop_token_ids=(stop,)))
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, inputs, jax.random.key(0), temperature=1.0))
    first_call = time.perf_counter() - t0
    jax_times, jax_tokens = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(sampler(params, inputs, jax.random.key(r + 1), temperature=1.0))
        jax_times.append(time.perf_counter() - t0)
        jax_tokens.append(int(np.asarray(out.lengths).sum()))
    compile_s = first_call - statistics.median(jax_times)

    torch_ids = torch.tensor(ids).long()
    gen_kwargs = dict(attention_mask=torch.ones_like(torch_ids), max_new_tokens=args.new, do_sample=True,
                      temperature=1.0, top_k=0, top_p=1.0, eos_token_id=stop, pad_token_id=0)
    with torch.no_grad():
        hf.generate(torch_ids[:, :8], **{**gen_kwargs, "max_new_tokens": 4})  # warm-up
        hf_times, hf_tokens = [], []
        for r in range(args.repeats):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            g = hf.generate(torch_ids, **gen_kwargs)
            hf_times.append(time.perf_counter() - t0)
            new = g[:, args.prompt:].numpy()
            # Tokens up to and including the first stop token count as generated.
            hit = (new == stop)
            lengths = np.where(hit.any(1), hit.argmax(1) + 1, new.shape[1])
            hf_tokens.append(int(lengths.sum()))

    jax_tps = statistics.median(t / s for t, s in zip(jax_tokens, jax_times))
    hf_tps = statistics.median(t / s for t, s in zip(hf_tokens, hf_times))
    figures = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, lm_params=int(n_params),
                   vrl_jax_tokens_per_s=round(jax_tps, 1), transformers_tokens_per_s=round(hf_tps, 1),
                   vrl_jax_compile_s=round(compile_s, 2), vrl_jax_step_s=[round(t, 3) for t in jax_times],
                   transformers_step_s=[round(t, 3) for t in hf_times], devices=str(jax.devices()[0].platform),
                   matmul_gflops=round(matmul_flops_per_s() / 1e9, 1),
                   cpu_count=os.cpu_count())
    print(f"vrl_jax:      {jax_tps:10.1f} tokens/s   (compile {compile_s:.1f} s, once per bucket)")
    print(f"transformers: {hf_tps:10.1f} tokens/s")
    print(json.dumps(figures))
    print(f"ratio vrl_jax/transformers tokens/s: {jax_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
