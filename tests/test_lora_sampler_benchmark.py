"""`benchmarks/lora_sampler.py` (listed in benchmarks/README.md) runs at the smallest shape, and what it
prints holds: vrl_jax's sampler on the adapted model, unmerged and merged, picks the same greedy tokens as
peft's `generate`, and not the base model's (the adapters are on and move the logits)."""

from __future__ import annotations

import json

from tests.test_cli_commands import ROOT, ok, run


def test_lora_sampler_benchmark_runs_and_agrees_with_peft():
    small = ["--batch", "2", "--prompt", "8", "--new", "4", "--repeats", "1"]
    out = ok(run(["python", "benchmarks/lora_sampler.py", *small], ROOT, timeout=600)).stdout
    lines = out.splitlines()
    assert lines[-1].startswith("ratio vrl_jax unmerged/peft tokens/s"), out[-2000:]
    figures = json.loads(lines[-2])
    assert figures["targets"] == [f"language.layers.{p}_w" for p in ("q", "k", "v", "o", "gate", "up", "down")]
    assert figures["torch_device"] == "cpu" and figures["adapter_bytes"] > 0, figures
    agreement = next(line for line in lines if line.startswith("greedy tokens"))
    assert ("unmerged vs merged: 2/2 rows identical; unmerged vs peft: 2/2 rows identical; "
            "unmerged vs the base model (peft, adapters off): 0/2") in agreement, agreement
