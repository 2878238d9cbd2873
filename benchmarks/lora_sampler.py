"""LoRA rollout throughput: vrl_jax's sampler on the adapted model, unmerged and merged, vs transformers
`generate` on peft's model with the same adapters, same run.

  python benchmarks/lora_sampler.py [--rank 16] [--targets REGEX] [--scale 1] [--batch 32] [--prompt 64]
                                    [--new 128] [--repeats 3]

sampler.py's model and rollout (a random Qwen2.5-VL-shaped model, text hidden 256 x `--scale`, 4 layers,
vocabulary 1024; 32 text-only prompts x 128 sampled tokens at temperature 1, top-k and top-p off), with
LoRA adapters of rank `--rank` (alpha 16, the config's default) on the projections whose path
"language.layers.<name>" `--targets` matches (as `model.lora.targets`; default all seven: q k v o gate up
down). A is drawn as `add_adapters` draws it and B ~ N(0, 0.05^2), so the adapters change the policy.

  unmerged  vrl_jax's `Sampler` on the adapted model, each projection `x @ W + (x @ A) @ B` (the loop's path)
  merged    vrl_jax's `Sampler` on `merge_adapters(model)`: W + A @ B * alpha / r, the adapters removed
  peft      transformers `generate` on the base model wrapped by `peft.PeftModel` (unmerged), the
            adapters written by `export_peft` and read by `PeftModel.from_pretrained`

Compilation is timed separately; steady state is the median of the repeats, the two vrl_jax samplers
taking turns (so a change in the machine's load falls on both). Also printed: what merging
costs (the time of `merge_adapters`, which a loop merging before each rollout pays every step, and the
bytes of the merged copies of the adapted weights, held next to the trained model's), and whether the
unmerged and merged samplers (and peft) pick the same tokens greedily (temperature 0) on every prompt,
and that the base model (peft with the adapters off) does not.
The last line is the ratio vrl_jax unmerged tokens/s / peft tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from common import (Rollouts, build_models, generate_kwargs, machine, set_torch_threads,  # benchmarks/common.py
                    text_prompts, time_generate, time_samplers, torch_device, torch_placement)

ALPHA = 16.0  # experiments' default `model.lora.alpha`
B_STD = 0.05  # large enough that the adapters move the logits visibly (as tests/test_lora_export.py)
STOP = 1023


def weight(model, path: str):
    """The parameter at dotted `path` ("language.layers.q_w_lora_b")."""
    from vrl_jax.models import lora
    module, name = lora.parent(model, path)
    return getattr(module, name)


def randomise_b(model, paths, seed: int = 0) -> None:
    """Replaces the zero-initialised B of each adapted projection (dotted paths) by N(0, B_STD^2) draws."""
    import jax.numpy as jnp
    from vrl_jax.models import lora
    rs = np.random.RandomState(seed)
    for path in paths:
        b = weight(model, path + lora.B_SUFFIX)
        b.set_value(jnp.asarray(B_STD * rs.randn(*b.shape), b.dtype))


def time_merge(model, repeats: int):
    """(the merged model, seconds of the first `merge_adapters` call, median seconds of `repeats` more)."""
    import jax
    from flax import nnx
    from vrl_jax.models.lora_export import merge_adapters
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        merged = merge_adapters(model)
        jax.block_until_ready(nnx.state(merged))
        times.append(time.perf_counter() - t0)
    return merged, times[0], statistics.median(times[1:])


def greedy_tokens(sampler, params, inputs) -> np.ndarray:
    """tokens [B, N] the sampler picks at temperature 0 (pad 0 after the stop token)."""
    import jax
    return np.asarray(sampler(params, inputs, jax.random.key(0), temperature=0.0).tokens)


def peft_greedy_tokens(peft, ids: np.ndarray, new: int) -> np.ndarray:
    """tokens [B, N] `generate` picks greedily, laid out as the sampler's (pad 0 after the stop token)."""
    import torch
    torch_ids = torch.tensor(ids).long().to(peft.device)
    with torch.no_grad():
        g = peft.generate(input_ids=torch_ids, attention_mask=torch.ones_like(torch_ids),
                          **generate_kwargs(new, STOP, greedy=True))[:, ids.shape[1]:].cpu().numpy()
    out = np.zeros((len(ids), new), np.int32)
    out[:, :g.shape[1]] = g
    return out


def agreement(x: np.ndarray, y: np.ndarray) -> str:
    """'k/B rows identical' for token arrays [B, N], with the first differing (row, position) if any."""
    same = (x == y).all(1)
    text = f"{int(same.sum())}/{len(same)} rows identical"
    if not same.all():
        row = int(np.argmin(same))
        text += f" (first difference: row {row}, token {int(np.argmax(x[row] != y[row]))})"
    return text


def nbytes(arrays) -> int:
    return int(sum(np.dtype(a.dtype).itemsize * a.size for a in arrays))


def main(argv):
    parser = argparse.ArgumentParser(prog="lora_sampler.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=r"^language\.layers\.(q|k|v|o|gate|up|down)_w$",
                        help="regex over 'language.layers.<name>' (as model.lora.targets)")
    parser.add_argument("--scale", type=int, default=1, help="width multiplier (common.build_checkpoint)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import jax
    from flax import nnx
    from peft import PeftModel

    from vrl_jax.models import lora
    from vrl_jax.models.lora_export import export_peft
    from vrl_jax.sampling.sampler import Sampler, SamplerConfig

    config = lora.LoraConfig(args.rank, ALPHA, args.targets)  # a bad rank or regex fails before any model is built
    set_torch_threads()
    device = torch_device()  # the GPU for both sides when JAX runs on one
    with tempfile.TemporaryDirectory() as d:
        hf, model, n_params = build_models(os.path.join(d, "base"), args.scale)
        names = lora.add_adapters(model, config, jax.random.key(0))
        randomise_b(model, names)
        export_peft(model, os.path.join(d, "adapter"), base_model_name_or_path=os.path.join(d, "base"))
        peft = PeftModel.from_pretrained(hf, os.path.join(d, "adapter")).to(device).eval()
    merged, merge_first_s, merge_s = time_merge(model, args.repeats)

    weights = nbytes(leaf for leaf in jax.tree.leaves(nnx.state(model)))
    adapted = nbytes(weight(model, n)[...] for n in names)  # the W that merging copies
    adapters = nbytes(weight(model, n + s)[...] for n in names for s in (lora.A_SUFFIX, lora.B_SUFFIX))

    ids, inputs = text_prompts(args.batch, args.prompt)
    cfg = SamplerConfig(max_new_tokens=args.new, stop_token_ids=(STOP,))
    samplers = {"unmerged": Sampler.for_model(model, cfg), "merged": Sampler.for_model(merged, cfg)}
    runs: dict[str, Rollouts] = time_samplers(samplers, inputs, args.repeats)
    runs["peft"] = time_generate(peft, ids, args.new, STOP, args.repeats)

    greedy = {k: greedy_tokens(s, p, inputs) for k, (s, p) in samplers.items()}
    greedy["peft"] = peft_greedy_tokens(peft, ids, args.new)
    with peft.disable_adapter():  # the base model: the adapters must change the policy for the check to mean anything
        greedy["base"] = peft_greedy_tokens(peft, ids, args.new)

    unmerged, merged_tps, peft_tps = (runs[k].tokens_per_s for k in ("unmerged", "merged", "peft"))
    # a loop that merged before every rollout: the merge, then a rollout of (at most) batch x new at the merged speed
    rollout_tokens = args.batch * args.new
    merge_each = rollout_tokens / (merge_s + rollout_tokens / merged_tps)
    figures = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new, scale=args.scale, rank=args.rank,
                   alpha=ALPHA, targets=list(names), lm_params=n_params, model_bytes=weights,
                   adapter_bytes=adapters, merged_copy_bytes=adapted,
                   merge_s=round(merge_s, 4), merge_first_call_s=round(merge_first_s, 3),
                   **{k: r.report() for k, r in runs.items()},
                   merged_with_per_rollout_merge_tokens_per_s=round(merge_each, 1),
                   devices=str(jax.devices()[0].platform), **machine(), **torch_placement(device))
    print(f"vrl_jax unmerged: {unmerged:10.1f} tokens/s   (compile {runs['unmerged'].compile_s:.1f} s)")
    print(f"vrl_jax merged:   {merged_tps:10.1f} tokens/s   (compile {runs['merged'].compile_s:.1f} s); "
          f"unmerged / merged {unmerged / merged_tps:.2f}")
    print(f"peft generate:    {peft_tps:10.1f} tokens/s")
    print(f"merging: {merge_s * 1e3:.1f} ms per merge_adapters ({merge_first_s:.2f} s the first time); merging "
          f"before every rollout gives {merge_each:.1f} tokens/s; the merged copies of the adapted weights "
          f"hold {adapted / 2**20:.1f} MiB more ({100 * adapted / weights:.0f}% of the model's "
          f"{weights / 2**20:.1f} MiB; adapters {adapters / 2**20:.2f} MiB)")
    print(f"greedy tokens, unmerged vs merged: {agreement(greedy['unmerged'], greedy['merged'])}; "
          f"unmerged vs peft: {agreement(greedy['unmerged'], greedy['peft'])}; "
          f"unmerged vs the base model (peft, adapters off): {agreement(greedy['unmerged'], greedy['base'])}")
    print(json.dumps(figures))
    print(f"ratio vrl_jax unmerged/peft tokens/s: {unmerged / peft_tps:.2f}")


if __name__ == "__main__":
    from vrl_jax.errors import run_cli
    sys.exit(run_cli(main, "lora_sampler.py"))
