"""One RL optimizer step: vrl_jax's compiled train step vs a PyTorch step on the transformers model.

  python benchmarks/train_step.py [--scale 1] [--batch 32] [--prompt 64] [--response 128] [--repeats 5] [--torch-threads N]
                                 [--layers unroll|scan]

Model: a randomly initialised Qwen2.5-VL-shaped model of ~3.7 M language parameters (text hidden
256, 4 layers, intermediate 768, 4 heads / 2 KV heads, vocabulary 1024: performance.md's shape),
the same weights on both sides. Batch: the same text-only token batch (prompt + response, loss on
response tokens), the same old log-probs and advantages.

Both sides do the same work per step: forward, PPO clipped surrogate (token mean) over the
response tokens' log-probs, backward, global-norm clipping at 1.0 and one AdamW update (lr 1e-6,
betas 0.9/0.95, eps 1e-5, wd 0.01) of the language model; the vision tower and connector are
frozen (MAYE's paper setting), float32 everywhere. PyTorch: `Qwen2_5_VLForConditionalGeneration`
forward (its default attention, SDPA), float32 log_softmax of the logits, `loss.backward()`,
`clip_grad_norm_`, `torch.optim.AdamW` (foreach). vrl_jax: `make_train_step` (one micro-batch), its 4 layers
unrolled as in `experiments/default.py` (`model.unroll_layers`; `--layers scan` times the layer scan instead).

Timing: warm-up first (compilation reported separately), then `--repeats` steps each side,
interleaved; medians. FLOP/s: model FLOPs per step (6 x matmul parameters x tokens + 12 x layers x
width x T x tokens for attention, the PaLM convention) over the median step time, against a jitted
2048 x 2048 float32 matmul measured in the same run. The last line is torch time / vrl_jax time.

On a machine where JAX runs on an NVIDIA GPU and PyTorch sees CUDA, both sides run on that GPU, float32
matmuls in TF32 on both (JAX's default there; PyTorch is set to match), and the matmul measured is
8192 x 8192. The same holds for `benchmarks/sampler.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from common import (build_checkpoint, machine, matmul_flops_per_s, matmul_size, torch_device,  # benchmarks/common.py
                    torch_placement, torch_sync)

LR, BETAS, EPS, WD, CLIP, PPO_CLIP = 1e-6, (0.9, 0.95), 1e-5, 0.01, 1.0, 0.2


def model_flops(cfg, batch: int, length: int) -> float:
    """Training FLOPs of one step over batch x length tokens (forward + backward = 3 x forward)."""
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    matmul_params = t.num_layers * per_layer + t.hidden_size * t.vocab_size
    tokens = batch * length
    return 6.0 * matmul_params * tokens + 12.0 * t.num_layers * q * length * tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="width multiplier of the model (3: ~8x the parameters)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="PyTorch intra-op threads (0 = one per core, its default). Its OpenMP threads slow "
                             "down sharply when another process holds a core; 1 is robust to that")
    parser.add_argument("--layers", choices=("unroll", "scan"), default="unroll",
                        help="vrl_jax's layer loop: straight-line code (the default experiment's) or a lax.scan")
    args = parser.parse_args()

    import jax
    import torch

    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.positions import text_positions
    from vrl_jax.models.weights import load_hf_params
    from vrl_jax.rl.losses import PolicyLossConfig
    from vrl_jax.rl.train_state import OptimizerConfig, create_train_state
    from vrl_jax.rl.train_step import StepConfig, TrainBatch, make_train_step

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    device = torch_device()  # the GPU for both sides when JAX runs on one
    with tempfile.TemporaryDirectory() as d:
        hf = build_checkpoint(d, args.scale)
        config = ModelConfig.from_pretrained(d)
        model = load_hf_params(d, config)
    model.language.unroll_layers = args.layers == "unroll"
    lm_params = sum(p.numel() for p in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()

    # The batch: prompts then responses, every row full length; targets are the next tokens.
    b, length = args.batch, args.prompt + args.response
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 1000, (b, length)).astype(np.int32)
    mask = np.ones_like(ids)
    positions, _ = text_positions(mask)
    targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    loss_mask = np.zeros((b, length), np.float32)
    loss_mask[:, args.prompt - 1:length - 1] = 1.0
    old = (-7.0 + 0.1 * rs.randn(b, length)).astype(np.float32)  # ~ log(1/1024): ratios near 1
    adv = np.repeat(rs.randn(b, 1), length, axis=1).astype(np.float32)

    # ---- vrl_jax -------------------------------------------------------------------------------
    opt_cfg = OptimizerConfig(learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD,
                              clip_grad_norm=CLIP, train_vit=False, train_connector=False, train_llm=True,
                              total_steps=1000)
    step_cfg = StepConfig(batch_size=b, num_micro=1, loss=PolicyLossConfig(clip_low=PPO_CLIP, clip_high=PPO_CLIP),
                          with_entropy=False)
    state, _, graphdef = create_train_state(model, opt_cfg)
    step = make_train_step(graphdef, opt_cfg, step_cfg)
    add = lambda x: jax.device_put(x[None])  # noqa: E731  (the leading micro-batch axis)
    batch = TrainBatch(add(ids), add(mask), jax.device_put(positions[None]), add(targets), add(loss_mask), add(old),
                       add(adv), jax.device_put(np.zeros((1, b), np.float32)))
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    jax_first = time.perf_counter() - t0
    xla_flops = step.jitted.lower(state, batch).compile().cost_analysis().get("flops", float("nan"))

    # ---- PyTorch -------------------------------------------------------------------------------
    hf.to(device).train()
    for name, p in hf.named_parameters():
        p.requires_grad_(not name.startswith("model.visual"))
    optim = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=LR, betas=BETAS, eps=EPS,
                              weight_decay=WD, foreach=True)
    t_ids, t_mask = torch.tensor(ids).long().to(device), torch.tensor(mask).long().to(device)
    t_pos, t_targets = torch.tensor(positions).long().to(device), torch.tensor(targets).long().to(device)
    t_lmask, t_old, t_adv = (torch.tensor(a).to(device) for a in (loss_mask, old, adv))

    def torch_step():
        logits = hf(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos).logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, t_targets[..., None])[..., 0]
        ratio = torch.exp(logp - t_old)
        pg = torch.maximum(-t_adv * ratio, -t_adv * torch.clamp(ratio, 1 - PPO_CLIP, 1 + PPO_CLIP))
        loss = (pg * t_lmask).sum() / t_lmask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in hf.parameters() if p.requires_grad], CLIP)
        optim.step()
        optim.zero_grad(set_to_none=True)
        torch_sync()
        return loss.detach()

    t0 = time.perf_counter()
    torch_loss0 = float(torch_step())
    torch_first = time.perf_counter() - t0
    # Same weights and batch: the first losses agree (a check that both sides do the same work).
    jax_loss0 = float(metrics["loss"])

    flops_peak = matmul_flops_per_s()
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        jax_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step()
        torch_times.append(time.perf_counter() - t0)
    flops_peak = max(flops_peak, matmul_flops_per_s())  # before and after: the machine is shared

    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    flops = model_flops(config, b, length)
    figures = dict(
        batch=b, tokens_per_row=length, response_tokens=int(loss_mask.sum()), lm_params=int(lm_params),
        model_gflop_per_step=round(flops / 1e9, 2), xla_gflop_per_step=round(float(xla_flops) / 1e9, 2),
        vrl_jax_step_s=round(jax_s, 4), torch_step_s=round(torch_s, 4),
        vrl_jax_compile_s=round(jax_first - jax_s, 2), torch_first_step_s=round(torch_first, 3),
        vrl_jax_gflop_per_s=round(flops / jax_s / 1e9, 2), torch_gflop_per_s=round(flops / torch_s / 1e9, 2),
        matmul_gflop_per_s=round(flops_peak / 1e9, 2), vrl_jax_fraction_of_matmul=round(flops / jax_s / flops_peak, 3),
        torch_fraction_of_matmul=round(flops / torch_s / flops_peak, 3), first_loss_vrl_jax=jax_loss0,
        first_loss_torch=torch_loss0, vrl_jax_times_s=[round(t, 4) for t in jax_times],
        torch_times_s=[round(t, 4) for t in torch_times], torch_threads=torch.get_num_threads(), layers=args.layers,
        **machine(), **torch_placement(device))
    print(f"vrl_jax: {jax_s * 1e3:9.1f} ms/step  {flops / jax_s / 1e9:6.1f} GFLOP/s "
          f"({100 * flops / jax_s / flops_peak:.0f}% of matmul)  compile {jax_first - jax_s:.1f} s")
    print(f"torch:   {torch_s * 1e3:9.1f} ms/step  {flops / torch_s / 1e9:6.1f} GFLOP/s "
          f"({100 * flops / torch_s / flops_peak:.0f}% of matmul)")
    n = matmul_size()
    print(f"matmul:  {flops_peak / 1e9:.1f} GFLOP/s (jitted {n}x{n} float32)")
    print(json.dumps(figures))
    print(f"ratio torch/vrl_jax step time: {torch_s / jax_s:.2f}")


if __name__ == "__main__":
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()  # both sides run under it (vrl_jax/host_malloc.py); machine() records it
    main()
