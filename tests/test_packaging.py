"""What setup.py declares: every package vrl_jax imports is in install_requires or in the extra of the
feature that needs it, and the README's `.[gcs]` extra brings what a gs:// workdir needs."""

from __future__ import annotations

import ast
import os
import re
import sys
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- install_requires --------------------------------------------------------------------------

# Imported only where an optional feature needs it, and declared in the extra that brings it.
# module vrl_jax imports only when a feature asks for it -> (the extra that installs it, its distribution)
OPTIONAL_IMPORTS = {"torch": ("test", "torch"), "tensorflow_datasets": ("tfds", "tensorflow-datasets"),
                    "wandb": ("wandb", "wandb"), "spacy": ("spacy", "spacy"),
                    "google": ("gcs", "google-cloud-storage")}  # google.cloud.storage, for gs:// workdirs


def _setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
              for t in n.targets if isinstance(t, ast.Name)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}

    def names(reqs):
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    extras = {k.value: names(consts[v.id] if isinstance(v, ast.Name) else ast.literal_eval(v))
              for k, v in zip(kw["extras_require"].keys, kw["extras_require"].values)}
    return names(ast.literal_eval(kw["install_requires"])), extras


def test_install_requires_names_every_package_vrl_jax_imports():
    """A package the code imports but install_requires leaves out works in CI only while something else
    brings it along; the bare-environment stage of .ci/run finds what the commands need, this finds the rest."""
    required, extras = _setup_requirements()
    imported = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "vrl_jax")):
        for name in files:
            if name.endswith(".py"):
                for node in ast.walk(ast.parse(open(os.path.join(folder, name)).read())):
                    if isinstance(node, ast.Import):
                        imported |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m not in ("vrl_jax", "__future__"))
    dists = metadata.packages_distributions()
    missing = []
    for module in third_party:
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if module in OPTIONAL_IMPORTS:
            extra, dist = OPTIONAL_IMPORTS[module]
            assert dist in extras[extra], f"{module}: {dist} is not in the {extra} extra"
        elif not names & required:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert not missing, f"imported by vrl_jax but not in install_requires: {missing}"
    assert len(third_party) > 10


def test_readme_gcs_extra(tmp_path):
    """`.[gcs]` installs what a gs:// workdir needs, and a run without it is told to install it."""
    import importlib.util

    from vrl_jax.errors import UserError, ensure_writable_dir
    assert _setup_requirements()[1]["gcs"] == {"gcsfs", "google-cloud-storage"}
    if importlib.util.find_spec("gcsfs") is None:  # this machine: the message names the extra
        with pytest.raises(UserError, match=re.escape('pip install -e ".[gcs]"')):
            ensure_writable_dir("gs://bucket/run", "--workdir")
