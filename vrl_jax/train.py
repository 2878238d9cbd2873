"""Train: `python -m vrl_jax.train --config experiments/<name>.py[:variant] --workdir DIR [--config.key=value ...]`.

The config file's `get_config(variant)` builds the experiment; it is locked before overrides apply,
so an unknown key or a value of the wrong type fails at once, and `configs.validate` checks values
and combinations (naming the key), and `run_setup.check_inputs` checks the data files, the model
directory and the workdir, before anything is generated, loaded or compiled. Rerunning the same
command on a workdir with checkpoints resumes it; a rerun with a changed config is refused (the
message lists the keys that differ) unless `--allow_config_change` is given. The run ends with a
report in `DIR/report/`. Mistakes print one paragraph and exit with code 2 (`--debug` or
VRL_JAX_DEBUG=1 shows the traceback); a run stopped by SIGTERM or Ctrl-C after saving exits 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
import sys
import traceback

from vrl_jax.errors import UserError, hide_logged_user_errors, run_cli

PROG = "python -m vrl_jax.train"
USAGE = (f"usage: {PROG} --config experiments/<name>.py[:variant] --workdir DIR [--config.KEY=VALUE ...] "
         "[--allow_config_change] [--noreport] [--debug]")
FLAGS_HELP = """flags:
  --config FILE.py[:variant]  the experiment (a Python file with get_config(variant))
  --workdir DIR               run directory: checkpoints, metrics, report; rerun to resume
  --config.KEY=VALUE          override one config key, e.g. --config.rl_steps=20 --config.model.path=ckpt/m
  --allow_config_change       resume a workdir whose checkpoints were written with a different config
  --[no]report                render the report when the run ends (default: true)
  --debug                     show the traceback of an error (or set VRL_JAX_DEBUG=1)"""


@dataclasses.dataclass
class Command:
    """What the command line asks for."""

    config: object  # a locked ml_collections.ConfigDict with the overrides applied
    workdir: str
    report: bool = True
    allow_config_change: bool = False


# ---------------------------------------------------------------------------------------------
# The config file


def _experiment_files(directory: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(".py") and not f.startswith("_"))
    except OSError:
        return []


def _where_in(exc: BaseException, files: set[str]) -> str:
    """`file, line N` of the innermost traceback frame inside one of `files` (the config file and its
    siblings), or '' when the error did not pass through them."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.abspath(f.filename) in files]
    return f"{frames[-1].filename}, line {frames[-1].lineno}" if frames else ""


def load_config_file(spec: str):
    """`FILE.py[:variant]` -> the ConfigDict its `get_config` returns; every failure is a UserError that
    names the file (and line) and what was expected."""
    import ml_collections
    path, _, arg = spec.partition(":")
    if not path:
        raise UserError(f"--config is empty; expected FILE.py[:variant]. {USAGE}")
    if not os.path.isfile(path):
        directory = os.path.dirname(path) or "."
        known = _experiment_files(directory) or _experiment_files("experiments")
        where = directory if _experiment_files(directory) else "experiments"
        hint = f" The experiment files in {where}/ are: {', '.join(known)}." if known else ""
        raise UserError(f"--config {spec}: no config file {path} (relative to {os.getcwd()}).{hint}")
    siblings = {os.path.abspath(os.path.join(os.path.dirname(path) or ".", f))
                for f in _experiment_files(os.path.dirname(path) or ".")} | {os.path.abspath(path)}
    module_spec = importlib.util.spec_from_file_location("vrl_jax_experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        column = f", column {e.offset}" if e.offset else ""
        text = f": {e.text.strip()}" if e.text and e.text.strip() else ""
        raise UserError(f"--config {spec}: {e.filename}, line {e.lineno}{column}: syntax error: {e.msg}{text}") \
            from e
    except Exception as e:  # noqa: BLE001 - whatever the file raises is reported with its line
        where = _where_in(e, siblings) or path
        raise UserError(f"--config {spec}: loading {where} failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"--config {spec}: {path} defines no get_config(variant) function; an experiment file "
                          "returns its ConfigDict from get_config (see experiments/default.py)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # the experiments' convention for an unknown variant or a bad argument
        raise UserError(f"--config {spec}: {e}") from e
    except Exception as e:  # noqa: BLE001
        where = _where_in(e, siblings) or path
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise UserError(f"--config {spec}: {call} failed at {where}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {spec}: get_config returned a {type(config).__name__}, expected an "
                          "ml_collections.ConfigDict (start from vrl_jax.configs.base_config())")
    return config


# ---------------------------------------------------------------------------------------------
# Overrides and flags


def _take_config_spec(argv: list[str]) -> tuple[str | None, list[str]]:
    """Removes `--config X` / `--config=X` from argv (the last one wins); overrides stay."""
    spec, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if re.fullmatch(r"--?config", arg):
            if i + 1 >= len(argv):
                raise UserError(f"--config needs a value, e.g. --config experiments/default.py. {USAGE}")
            spec, i = argv[i + 1], i + 2
            continue
        m = re.fullmatch(r"--?config=(.*)", arg, flags=re.S)
        if m:
            spec = m.group(1)
        else:
            rest.append(arg)
        i += 1
    return spec, rest


def _unknown_key_message(config, dotted: str) -> str:
    """`config.a.b: no such key; config.a has ...; did you mean ...?` for the first missing part."""
    node, seen = config, []
    for part in dotted.split("."):
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            parent = ".".join(["config", *seen])
            close = difflib.get_close_matches(part, keys, n=1)
            guess = f"; did you mean {parent}.{close[0]}?" if close else ""
            what = f"{parent} has {', '.join(keys)}" if keys else f"{parent} is a value, not a section"
            return f"--config.{dotted}: {parent}.{part} is not a config key ({what}){guess}"
        node, seen = node[part], [*seen, part]
    return f"--config.{dotted}: cannot be overridden"


def _type_name(value) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             tuple: "a tuple such as '(1, 2)'", list: "a list"}
    return names.get(type(value), type(value).__name__)


def _bad_value_message(config, error) -> str:
    """absl's 'flag --config.k=v: reason' as 'config.k takes <type> (now <value>); got v: reason'."""
    m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", str(error), flags=re.S)
    if not m:
        return str(error)
    key, value, reason = m.groups()
    from ml_collections.config_flags import config_path
    try:
        current = config_path.get_value(key, config)
    except (KeyError, AttributeError, IndexError):
        return f"--config.{key}={value}: {reason}"
    return f"--config.{key}={value}: config.{key} takes {_type_name(current)} (now {current!r}); {reason}"


def parse_config_flags(argv: list[str], prog: str, usage: str, define=lambda fv: None):
    """argv (without the program name) -> (the locked config with its overrides, the parsed FlagValues).
    `define(fv)` adds the command's own flags. Raises UserError naming the flag or key at fault."""
    from absl import flags
    from ml_collections import config_flags
    spec, rest = _take_config_spec(argv)
    if spec is None:
        raise UserError(f"--config is required, e.g. --config experiments/default.py. {usage}")
    config = load_config_file(spec)
    fv = flags.FlagValues()
    define(fv)
    argv = [prog, *rest]
    overrides = [a.split("=", 1)[0].lstrip("-").removeprefix("no") for a in rest
                 if re.match(r"--?(no)?config\.", a)]
    for name in overrides:  # an unknown key fails inside ml_collections with a bare KeyError
        dotted = name.split(".", 1)[1]
        try:
            config_flags.config_path.get_value(dotted, config)
        except (KeyError, AttributeError, IndexError):
            raise UserError(_unknown_key_message(config, dotted)) from None
    try:
        config_flags.DEFINE_config_dict("config", config, flag_values=fv, lock_config=True, sys_argv=argv)
        positional = fv(argv)[1:]
    except flags.IllegalFlagValueError as e:
        raise UserError(_bad_value_message(config, e)) from e
    except flags.UnrecognizedFlagError as e:
        raise UserError(f"unknown flag --{e.flagname}. {usage}") from e
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        raise UserError(f"{e} ({usage})") from e
    if positional:
        raise UserError(f"unexpected argument(s) {positional}; flags take the form --name=value. {usage}")
    return config, fv


def parse_command_line(argv: list[str]) -> Command:
    """argv (without the program name) -> Command. Raises UserError naming the flag or key at fault."""
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
        flags.DEFINE_bool("report", True, "render the report when the run ends", flag_values=fv)
        flags.DEFINE_bool("allow_config_change", False, "resume checkpoints written with another config",
                          flag_values=fv)

    config, fv = parse_config_flags(argv, PROG, USAGE, define)
    if not fv.workdir:
        raise UserError(f"--workdir is required: the directory for checkpoints, metrics and the report. {USAGE}")
    return Command(config, fv.workdir, fv.report, fv.allow_config_change)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
        print(__doc__.strip() + "\n\n" + USAGE + "\n\n" + FLAGS_HELP)
        return 0
    from absl import flags, logging
    command = parse_command_line(argv)
    if not flags.FLAGS.is_parsed():  # libraries (grain) read their absl flags; they take the defaults
        flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    hide_logged_user_errors()  # a full disk is reported once below, not by every orbax thread
    from vrl_jax import distributed
    distributed.split_cpu_host(command.config)  # mesh.cpu_devices, before JAX starts its CPU backend
    distributed.initialize(command.config)  # joins a multi-process run before anything asks for devices
    import jax
    workdir = command.workdir
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        # A restarted (preempted, killed) run reuses the compiled steps instead of compiling again.
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    distributed.cache_off_on_split_host()  # XLA:CPU's in-process collectives deadlock when loaded from it
    from vrl_jax.trainer import train  # validates the config and checks the inputs before anything slow
    result = train(command.config, workdir, allow_config_change=command.allow_config_change)
    if result.stopped:
        print(result.stopped, flush=True)
        return 0
    from vrl_jax.evaluation.evaluator import breakdown_lines, parse_breakdown_key
    for key, value in sorted(result.metrics.items()):
        if parse_breakdown_key(key) is None:  # the per-field accuracies follow as one line per setting
            print(f"{key}: {value:.4f}")
    for line in breakdown_lines(result.metrics):
        print(line)
    if jax.process_index() == 0:  # the first -> last evaluation, paired by problem, with its noise
        from vrl_jax.evaluation.paired import change_lines
        for line in change_lines(workdir):
            print(f"change {line}")
    if command.report and jax.process_index() == 0:
        from vrl_jax.evaluation.report import make_report
        print(f"report: {make_report([workdir])}")
    return 0


if __name__ == "__main__":
    from vrl_jax.host_malloc import reexec_with_huge_pages
    reexec_with_huge_pages()  # huge pages for XLA's per-step buffers: vrl_jax/host_malloc.py
    sys.exit(run_cli(main, PROG))
