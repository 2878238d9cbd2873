"""Rollout throughput: vrl_jax's compiled sampler vs transformers `generate`, same model, same run.

  python benchmarks/sampler.py [--batch 32] [--prompt 64] [--new 128] [--repeats 3] [--devices 2]
                               [--decode-segments 4] [--layers unroll|scan]

A randomly initialised Qwen2.5-VL-shaped model of ~3.7 M parameters (text hidden 256, 4 layers,
vocabulary 1024; performance.md's peer figure is ~455 tokens/s for transformers on 2 cores),
text-only prompts, sampling at temperature 1 with top-k and top-p off on both sides. Both see the
same weights. Compilation is timed separately; steady state is the median of the repeats. The last
line is the ratio vrl_jax tokens/s / transformers tokens/s.

`--devices N` (CPU only) splits the batch over N host devices, data-parallel, as a run on N accelerators
would (`mesh.data=N`): XLA:CPU runs a decode step's small GEMMs on one core, while each device runs on its
own thread, so N devices use N cores; `generate` uses every core through PyTorch's threads either way.
The single-device sampler is timed in the same run, interleaved, and printed too.

`--decode-segments K` (default 4, as in a run) decodes in K loops, each reading the response cache only up to
its end; a one-loop sampler (the whole cache every step) is timed in the same run, interleaved, and printed.

On CPU a sampler compiled with YNN's dots (jax's default there since 0.10, which the training programs use
and the sampler turns off: `sampler.decode_compiler_options`) is timed in the same run too.

`--layers scan` (the default, the sampler's `SamplerConfig.unroll_layers=False` whatever the model trains with)
runs the 4 layers as a `lax.scan` over the stacked layers inside the decode loop; a sampler with the other layer
loop (`unroll`: straight-line code) is timed in the same run, interleaved, and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

from common import (build_models, machine, matmul_flops_per_s, set_torch_threads, text_prompts,  # benchmarks/common.py
                    time_generate, time_samplers, torch_device, torch_placement)

SEGMENTS = 4  # vrl_jax's default (configs.base_config: rollout.decode_segments)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1,
                        help="CPU devices to split the batch over (one per core); 1: one device")
    parser.add_argument("--decode-segments", type=int, default=SEGMENTS,
                        help=f"the sampler's decode loops (rollout.decode_segments, default {SEGMENTS}); a one-loop "
                             "sampler is timed in the same run for comparison")
    parser.add_argument("--layers", choices=("unroll", "scan"), default="scan",
                        help="the sampler's layer loop (SamplerConfig.unroll_layers): a lax.scan (the default) or "
                             "straight-line code; the other one is timed in the same run")
    args = parser.parse_args()
    if args.decode_segments < 1:
        parser.error(f"--decode-segments {args.decode_segments} must be >= 1")
    if args.devices < 1 or args.batch % args.devices:
        parser.error(f"--devices {args.devices} must be >= 1 and divide --batch {args.batch}")
    if args.devices > 1:  # before jax starts its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()

    import jax

    from vrl_jax.rl.logprobs import training_compiler_options
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig

    set_torch_threads()
    device = torch_device()  # the GPU for both sides when JAX runs on one
    stop = 1023
    with tempfile.TemporaryDirectory() as d:
        hf, model, n_params = build_models(d)
    hf.to(device)
    ids, inputs = text_prompts(args.batch, args.prompt)

    cfg = SamplerConfig(max_new_tokens=args.new, stop_token_ids=(stop,), decode_segments=args.decode_segments)
    other = "scan" if args.layers == "unroll" else "unroll"
    cfg = dataclasses.replace(cfg, unroll_layers=args.layers == "unroll")
    samplers = {f"1 device, {other}": Sampler.for_model(model, dataclasses.replace(cfg,
                                                                                 unroll_layers=other == "unroll")),
                "1 device": Sampler.for_model(model, cfg)}
    if training_compiler_options():  # CPU: YNN's dots, as the training programs compile; the sampler turns them off
        samplers["1 device, YNN dots"] = Sampler.for_model(model, cfg, compiler_options=training_compiler_options())
    if args.decode_segments > 1:  # what the segments buy, interleaved with the rest
        samplers["1 loop"] = Sampler.for_model(model, dataclasses.replace(cfg, decode_segments=1))
    if args.devices > 1:
        if jax.devices()[0].platform != "cpu" or jax.device_count() < args.devices:
            raise SystemExit(f"--devices {args.devices}: needs a CPU backend (found {jax.device_count()} "
                             f"{jax.devices()[0].platform} devices)")
        from jax.sharding import NamedSharding, PartitionSpec
        from flax import nnx

        from vrl_jax import sharding
        mesh = sharding.make_mesh(sharding.MeshConfig(data=args.devices), jax.devices()[:args.devices])
        graphdef, params = nnx.split(model)
        samplers[f"{args.devices} devices"] = (Sampler(graphdef, cfg, mesh=mesh),
                                               jax.device_put(params, NamedSharding(mesh, PartitionSpec())))
    timed = time_samplers(samplers, inputs, args.repeats)
    ours = timed[f"{args.devices} devices" if args.devices > 1 else "1 device"]
    theirs = time_generate(hf, ids, args.new, stop, args.repeats)

    jax_tps, hf_tps = ours.tokens_per_s, theirs.tokens_per_s
    figures = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, lm_params=n_params, devices=args.devices,
                   vrl_jax_tokens_per_s=round(jax_tps, 1), transformers_tokens_per_s=round(hf_tps, 1),
                   vrl_jax_compile_s=round(ours.compile_s, 2), vrl_jax_step_s=[round(t, 3) for t in ours.step_s],
                   transformers_step_s=[round(t, 3) for t in theirs.step_s], platform=str(jax.devices()[0].platform),
                   matmul_gflops=round(matmul_flops_per_s() / 1e9, 1),
                   **machine(), **torch_placement(device))
    figures["decode_segments"] = args.decode_segments
    figures["layers"] = args.layers
    figures[f"vrl_jax_{other}_tokens_per_s"] = round(timed[f"1 device, {other}"].tokens_per_s, 1)
    print(f"vrl_jax, 1 device, layers {other}: {timed[f'1 device, {other}'].tokens_per_s:10.1f} tokens/s")
    if "1 device, YNN dots" in timed:
        figures["vrl_jax_ynn_dots_tokens_per_s"] = round(timed["1 device, YNN dots"].tokens_per_s, 1)
        print(f"vrl_jax, 1 device, YNN dots: {timed['1 device, YNN dots'].tokens_per_s:10.1f} tokens/s")
    if args.decode_segments > 1:
        figures["vrl_jax_1_loop_tokens_per_s"] = round(timed["1 loop"].tokens_per_s, 1)
        print(f"vrl_jax, 1 device, 1 decode loop: {timed['1 loop'].tokens_per_s:10.1f} tokens/s")
    if args.devices > 1:
        figures["vrl_jax_1_device_tokens_per_s"] = round(timed["1 device"].tokens_per_s, 1)
        print(f"vrl_jax, 1 device: {timed['1 device'].tokens_per_s:10.1f} tokens/s")
    print(f"vrl_jax:      {jax_tps:10.1f} tokens/s   (compile {ours.compile_s:.1f} s, once per bucket"
          f"{f'; {args.devices} devices' if args.devices > 1 else ''})")
    print(f"transformers: {hf_tps:10.1f} tokens/s")
    print(json.dumps(figures))
    print(f"ratio vrl_jax/transformers tokens/s: {jax_tps / hf_tps:.2f}")


if __name__ == "__main__":
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()  # both sides run under it (vrl_jax/host_malloc.py); machine() records it
    main()
