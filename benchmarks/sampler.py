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
import tempfile

from common import (build_models, matmul_flops_per_s, set_torch_threads, text_prompts,  # benchmarks/common.py
                    time_generate, time_sampler)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax

    from vrl_jax.sampling.sampler import Sampler, SamplerConfig

    set_torch_threads()
    stop = 1023
    with tempfile.TemporaryDirectory() as d:
        hf, model, n_params = build_models(d)
    ids, inputs = text_prompts(args.batch, args.prompt)

    sampler, params = Sampler.for_model(model, SamplerConfig(max_new_tokens=args.new, stop_token_ids=(stop,)))
    ours = time_sampler(sampler, params, inputs, args.repeats)
    theirs = time_generate(hf, ids, args.new, stop, args.repeats)

    jax_tps, hf_tps = ours.tokens_per_s, theirs.tokens_per_s
    figures = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, lm_params=n_params,
                   vrl_jax_tokens_per_s=round(jax_tps, 1), transformers_tokens_per_s=round(hf_tps, 1),
                   vrl_jax_compile_s=round(ours.compile_s, 2), vrl_jax_step_s=[round(t, 3) for t in ours.step_s],
                   transformers_step_s=[round(t, 3) for t in theirs.step_s], devices=str(jax.devices()[0].platform),
                   matmul_gflops=round(matmul_flops_per_s() / 1e9, 1),
                   cpu_count=os.cpu_count())
    print(f"vrl_jax:      {jax_tps:10.1f} tokens/s   (compile {ours.compile_s:.1f} s, once per bucket)")
    print(f"transformers: {hf_tps:10.1f} tokens/s")
    print(json.dumps(figures))
    print(f"ratio vrl_jax/transformers tokens/s: {jax_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
