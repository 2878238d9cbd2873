"""Writes generated splits as a dataset directory in MAYE, EasyR1 and DyME formats.

Layout of `out_dir` (one copy of every image, shared by the file formats that reference paths):
    images/<split>/<index>-<family>.png
    maye_<split>.jsonl       MAYE records; `image` relative to this file's directory
    easyr1_<split>.parquet   `problem`, `answer`, `images` = [{bytes, path}] (PNG bytes inline)
    dyme_<split>.json        JSON array: `question` (no '<image>'), bare `answer`, `hint`,
                             `visual_fact` (a JSON string), `image` relative to this file's directory
    manifest.json, README.md counts per split, family, level and modality; generator version
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable, Mapping

from vrl_jax.data.synthgeo.generator import (GENERATOR_VERSION, IMAGE_TOKEN, GeneratorConfig, SynthItem,
                                             fingerprint, generate_split, png_bytes)
from vrl_jax.data.synthgeo.splits import SPLITS

FORMATS = ("maye", "easyr1", "dyme")


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    return formats


def maye_record(item: SynthItem) -> dict:
    return item.record(f"images/{item.image_name}")


def dyme_record(item: SynthItem) -> dict:
    """DyME's keys; the answer is bare because DyME's collectors prepend the 'Answer:' flag."""
    return {"id": item.id, "question": item.question[len(IMAGE_TOKEN):], "answer": item.answer,
            "hint": item.hint, "visual_fact": json.dumps(item.visual_facts, sort_keys=True),
            "image": f"images/{item.image_name}", "family": item.family, "level": item.level,
            "modality": item.modality}


def easyr1_row(item: SynthItem, png: bytes) -> dict:
    return {"id": item.id, "problem": item.question, "answer": item.answer, "solution": item.solution,
            "images": [{"bytes": png, "path": None}], "family": item.family, "level": item.level,
            "modality": item.modality}


def _write_parquet(path: str, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("solution", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("family", pa.string()), ("level", pa.int32()), ("modality", pa.string()),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_split(out_dir: str, split: str, items: Iterable[SynthItem], formats: Iterable[str],
                on_item: Callable[[SynthItem], None] | None = None) -> dict:
    """Writes one split's images and files; returns its manifest entry (counts, fingerprint)."""
    formats = check_formats(formats)
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    counts = {key: collections.Counter() for key in ("family", "level", "modality")}
    problems = collections.defaultdict(set)
    rows, dyme, written = [], [], []
    maye_path = os.path.join(out_dir, f"maye_{split}.jsonl")
    maye_file = open(maye_path, "w", encoding="utf-8") if "maye" in formats else None
    try:
        for item in items:
            png = png_bytes(item.image)
            with open(os.path.join(out_dir, "images", item.image_name), "wb") as f:
                f.write(png)
            if maye_file is not None:
                maye_file.write(json.dumps(maye_record(item), sort_keys=True) + "\n")
            if "easyr1" in formats:
                rows.append(easyr1_row(item, png))
            if "dyme" in formats:
                dyme.append(dyme_record(item))
            for key in counts:
                counts[key][str(getattr(item, key))] += 1
            problems[item.family].add(item.meta["semantic_key"])
            written.append(item)
            if on_item is not None:
                on_item(item)
    finally:
        if maye_file is not None:
            maye_file.close()
    files = [f"maye_{split}.jsonl"] if "maye" in formats else []
    if "easyr1" in formats:
        _write_parquet(os.path.join(out_dir, f"easyr1_{split}.parquet"), rows)
        files.append(f"easyr1_{split}.parquet")
    if "dyme" in formats:
        with open(os.path.join(out_dir, f"dyme_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(dyme, f, indent=1)
        files.append(f"dyme_{split}.json")
    return {"count": len(written), "files": files, "fingerprint": fingerprint(written),
            **{f"by_{key}": dict(sorted(c.items())) for key, c in counts.items()},
            "distinct_problems_by_family": {k: len(v) for k, v in sorted(problems.items())}}


def export_dataset(out_dir: str, sizes: Mapping[str, int], config: GeneratorConfig = GeneratorConfig(),
                   formats: Iterable[str] = FORMATS, progress: bool = True,
                   on_item: Callable[[SynthItem], None] | None = None) -> dict:
    """Generates `sizes[split]` items per split into `out_dir`; returns (and writes) the manifest.

    `on_item` sees every item once it is written (e.g. to collect tokenizer training text)."""
    formats = check_formats(formats)
    unknown = [s for s in sizes if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; expected names from {SPLITS}")
    os.makedirs(out_dir, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(sizes.values()), desc="synthgeo", unit="item", disable=not progress)

    def written(item: SynthItem) -> None:
        bar.update(1)
        if on_item is not None:
            on_item(item)

    splits = {}
    try:
        for split in SPLITS:
            if sizes.get(split, 0) > 0:
                bar.set_postfix_str(split)
                splits[split] = write_split(out_dir, split, generate_split(split, sizes[split], config),
                                            formats, on_item=written)
    finally:
        bar.close()
    manifest = {"generator_version": GENERATOR_VERSION, "config": config.to_dict(), "formats": list(formats),
                "splits": splits}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme(manifest))
    return manifest


def regenerate_command(manifest: Mapping) -> str:
    """The CLI call that writes this dataset again (test_iid and test_ood share --test)."""
    config, counts = manifest["config"], {s: e["count"] for s, e in manifest["splits"].items()}
    return (f"python -m vrl_jax.data.synthgeo --out DIR --train {counts.get('train', 0)} "
            f"--val {counts.get('val', 0)} --test {counts.get('test_iid', counts.get('test_ood', 0))} "
            f"--seed {config['seed']} --formats {','.join(manifest['formats'])} "
            f"--families {','.join(config['families'])} --levels {','.join(map(str, config['levels']))} "
            f"--text-fraction {config['text_fraction']} --image-size {config['image_size']}")


def readme(manifest: Mapping) -> str:
    """A human summary of the manifest: what was generated, how, and how many of each."""
    config = manifest["config"]
    lines = [
        f"# synthgeo v{manifest['generator_version']}", "",
        "Procedurally generated visual-math problems (vrl_jax.data.synthgeo). Answers are computed",
        "exactly from each problem's parameters; splits are assigned by a hash of those parameters,",
        "so no problem appears in two splits; `test_ood` holds the held-out parameter region.", "",
        f"Regenerate: `{regenerate_command(manifest)}`", "",
        f"- families: {', '.join(config['families'])}",
        f"- levels (train/val/test_iid): {config['levels']}; test_ood uses level 3",
        f"- formats: {', '.join(manifest['formats'])}", "",
        "| split | items | distinct problems | vision | text | fingerprint |", "|---|---|---|---|---|---|",
    ]
    for split, entry in manifest["splits"].items():
        modality = entry["by_modality"]
        lines.append(f"| {split} | {entry['count']} | {sum(entry['distinct_problems_by_family'].values())} | "
                     f"{modality.get('vision', 0)} | {modality.get('text', 0)} | `{entry['fingerprint'][:16]}` |")
    families = sorted({f for e in manifest["splits"].values() for f in e["by_family"]})
    lines += ["", "Items per family (distinct problems in parentheses):", "",
              "| split | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for split, entry in manifest["splits"].items():
        cells = [f"{entry['by_family'].get(f, 0)} ({entry['distinct_problems_by_family'].get(f, 0)})"
                 for f in families]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", "Items per difficulty level:", "", "| split | " + " | ".join(f"level {lv}" for lv in range(4))
              + " |", "|---|" + "---|" * 4]
    for split, entry in manifest["splits"].items():
        lines.append(f"| {split} | " + " | ".join(str(entry["by_level"].get(str(lv), 0)) for lv in range(4))
                     + " |")
    return "\n".join(lines) + "\n"
