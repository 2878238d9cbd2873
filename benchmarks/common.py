"""What the benchmarks share: performance.md's tiny Qwen2.5-VL-shaped peer model, the machine's
measured matmul throughput (the physical limit a CPU step is compared against), and the rollout
timing both sampler benchmarks use (random text prompts, vrl_jax's `Sampler` and transformers
`generate` timed the same way), and a description of the machine every figure line carries."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time

import numpy as np


# The widest vector extensions first: which one a CPU has moves XLA:CPU's and PyTorch's kernels differently,
# so the same script gives other ratios on another CPU (benchmarks/README.md, "The CPU matters").
_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")


def machine() -> dict:
    """The machine a figure was measured on: CPU model (with family/model on x86 Linux, which tells AMD EPYC
    generations apart when the name does not), its widest vector extension, cores, the 1-minute load, and
    glibc's tunables (`vrl_jax/host_malloc.py` adds huge pages for large buffers, to both sides alike)."""
    info = {"cpu_model": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu_model"] = fields.get("model name", info["cpu_model"])
        if "cpu family" in fields:
            info["cpu_family_model"] = f"{fields['cpu family']}/{fields.get('model', '?')}"
        flags = set((fields.get("flags") or fields.get("Features") or "").split())
        info["vector_isa"] = next((isa for isa in _ISAS if isa in flags), "unknown")
    except OSError:  # not Linux
        pass
    info["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    info["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    if "jax" in sys.modules:  # the accelerator vrl_jax ran on, if any (`torch_placement` says where PyTorch ran)
        import jax
        if jax.default_backend() != "cpu":
            info["jax_device"] = jax.devices()[0].device_kind
    return info


def on_gpu() -> bool:
    """Whether this run compares on a GPU: JAX's default backend is one and PyTorch sees CUDA. Then both sides
    run there (a benchmark never pits a GPU against a CPU); else both run on the CPU."""
    if "jax" not in sys.modules:  # not started yet: nothing has chosen a backend
        return False
    import jax
    import torch
    return jax.default_backend() == "gpu" and torch.cuda.is_available()


def torch_device() -> str:
    """Where the PyTorch peer runs, and, on a GPU, float32 matmuls at the same precision on both sides:
    JAX's default on NVIDIA GPUs is TF32 for float32 dots; PyTorch's is full float32 unless told."""
    import torch
    if not on_gpu():
        return "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    torch.set_float32_matmul_precision("high")
    return "cuda"


def torch_placement(device: str) -> dict:
    """For a figure line: where the PyTorch peer ran (`torch_device()`'s answer) and, on a GPU, the matmul
    precision both sides used."""
    import torch
    if device == "cpu":
        return {"torch_device": "cpu"}
    return {"torch_device": torch.cuda.get_device_name(), "float32_matmuls": "TF32 on both sides"}


def torch_sync() -> None:
    """Waits for PyTorch's queued GPU work before a timer stops (CUDA kernels run asynchronously)."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def build_checkpoint(directory: str, scale: int = 1):
    """A random ~3.7 M-parameter Qwen2.5-VL (text hidden 256, 4 layers, intermediate 768, 4 heads /
    2 KV heads, vocabulary 1024) saved to `directory`; returns the transformers model. `scale` multiplies
    the width (hidden, intermediate, heads): scale 3 is ~8x the matmul parameters."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    text = dict(vocab_size=1024, hidden_size=256 * scale, intermediate_size=768 * scale, num_hidden_layers=4,
                num_attention_heads=4 * scale,
                num_key_value_heads=2 * scale, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=2, hidden_size=64, out_hidden_size=256 * scale, intermediate_size=128, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=1000,
                           video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(directory)
    return model


def matmul_size() -> int:
    """The side of `matmul_flops_per_s`'s square matmul: 2048 on a CPU, 8192 on a GPU (where 2048 would
    measure launch overhead)."""
    return 8192 if on_gpu() else 2048


def matmul_flops_per_s(repeats: int = 10) -> float:
    """Measured float32 matmul throughput of this machine (jitted n x n @ n x n, n = `matmul_size()`)."""
    import jax
    import jax.numpy as jnp
    n = matmul_size()
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def build_models(directory: str, scale: int = 1):
    """`build_checkpoint(directory, scale)` and the same weights loaded by vrl_jax: (the transformers
    model, the vrl_jax `QwenVL`, the language model's parameter count with its head)."""
    from vrl_jax.models.config import ModelConfig
    from vrl_jax.models.weights import load_hf_params
    hf = build_checkpoint(directory, scale)
    model = load_hf_params(directory, ModelConfig.from_pretrained(directory))
    n_params = sum(p.numel() for p in hf.model.language_model.parameters()) + hf.lm_head.weight.numel()
    return hf, model, int(n_params)


def text_prompts(batch: int, prompt: int, seed: int = 0):
    """Random text-only prompts: (ids int32 [batch, prompt] below the special tokens, no padding, and
    their vrl_jax `ModelInputs`)."""
    from vrl_jax.models.positions import text_positions
    from vrl_jax.models.processor import ModelInputs
    ids = np.random.RandomState(seed).randint(0, 1000, (batch, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    positions, next_position = text_positions(mask)
    return ids, ModelInputs(ids, mask, positions, next_position, None)


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """tokens_per_s: the median over repeats of generated tokens / seconds; step_s: each repeat's
    seconds; compile_s: the first call's extra seconds over the median (None where not compiled)."""

    tokens_per_s: float
    step_s: list
    compile_s: float | None = None

    def report(self) -> dict:
        return dict(tokens_per_s=round(self.tokens_per_s, 1), step_s=[round(t, 3) for t in self.step_s],
                    **({} if self.compile_s is None else dict(compile_s=round(self.compile_s, 2))))


def _rollouts(tokens: list, times: list, compile_s=None) -> Rollouts:
    return Rollouts(statistics.median(t / s for t, s in zip(tokens, times)), times, compile_s)


def time_samplers(samplers: dict, inputs, repeats: int, temperature: float = 1.0) -> dict:
    """Times vrl_jax `Sampler`s {name: (sampler, params)} on `inputs`: {name: Rollouts}. Each is called once
    (compiles), then `repeats` rounds call each in turn with new keys: interleaved, so a change in the
    machine's load during the run falls on all of them alike."""
    import jax

    def call(name, r):
        sampler, params = samplers[name]
        t0 = time.perf_counter()
        out = jax.block_until_ready(sampler(params, inputs, jax.random.key(r), temperature=temperature))
        return time.perf_counter() - t0, int(np.asarray(out.lengths).sum())

    first_call = {name: call(name, 0)[0] for name in samplers}
    runs = {name: [] for name in samplers}
    for r in range(repeats):
        for name in samplers:
            runs[name].append(call(name, r + 1))
    result = {}
    for name, calls in runs.items():
        times, tokens = [t for t, _ in calls], [n for _, n in calls]
        result[name] = _rollouts(tokens, times, first_call[name] - statistics.median(times))
    return result


def time_sampler(sampler, params, inputs, repeats: int, temperature: float = 1.0) -> Rollouts:
    """`time_samplers` of one sampler."""
    return time_samplers({"": (sampler, params)}, inputs, repeats, temperature)[""]


def set_torch_threads() -> None:
    import torch
    torch.set_num_threads(os.cpu_count() or 1)


def generate_kwargs(new: int, stop: int, greedy: bool = False) -> dict:
    """transformers `generate` settings matching the sampler: T=1 with top-k and top-p off, or greedy."""
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return dict(max_new_tokens=new, eos_token_id=stop, pad_token_id=0, **sampling)


def generated_lengths(new_tokens: np.ndarray, stop: int) -> np.ndarray:
    """new_tokens [B, N] -> [B]: tokens up to and including the first stop token count as generated."""
    hit = new_tokens == stop
    return np.where(hit.any(1), hit.argmax(1) + 1, new_tokens.shape[1])


def time_generate(model, ids: np.ndarray, new: int, stop: int, repeats: int) -> Rollouts:
    """Times transformers `generate` (on a transformers or peft model, on its device) on ids [B, P] after a
    short warm-up, seeding torch with the repeat's index."""
    import torch
    torch_ids = torch.tensor(ids).long().to(model.device)
    kwargs = dict(attention_mask=torch.ones_like(torch_ids), **generate_kwargs(new, stop))
    times, tokens = [], []
    with torch.no_grad():
        model.generate(input_ids=torch_ids[:, :8], **{**kwargs, "attention_mask": kwargs["attention_mask"][:, :8],
                                                     "max_new_tokens": 4})  # warm-up
        for r in range(repeats):
            torch.manual_seed(r)
            torch_sync()
            t0 = time.perf_counter()
            g = model.generate(input_ids=torch_ids, **kwargs)
            torch_sync()
            times.append(time.perf_counter() - t0)
            tokens.append(int(generated_lengths(g[:, ids.shape[1]:].cpu().numpy(), stop).sum()))
    return _rollouts(tokens, times)
