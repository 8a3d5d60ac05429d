"""Command-line plumbing shared by the entry points: compose, pre-flight checks, one-line errors."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import sys
from typing import Any, NoReturn

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# Hydra flags that take a value; everything else starting with "-" stands alone.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "--config-name", "-cn",
                "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun"}
_INSPECT_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
                  "-sc"}


def fail(message: str | None, *, remove: str | None = None) -> NoReturn:
    """One line on stderr, exit status 2; undo what Hydra created in `remove`, if anything.

    Under torchrun every process checks the same input: only one of them prints.
    """
    if message and _speaks():
        print(f"error: {message}", file=sys.stderr, flush=True)
    if remove:
        _remove_hydra_leftovers(remove)
    sys.exit(2)


def _speaks() -> bool:
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not under torchrun (and torch not needed)
        return True
    from partition.launch import first_to_report

    return first_to_report("bad-input")


def _remove_hydra_leftovers(folder: str) -> None:
    """Remove only what Hydra wrote before the task ran (.hydra/, the job log), then the
    folder if that leaves it empty — never a user's earlier results."""
    if not os.path.isdir(folder):
        return
    shutil.rmtree(os.path.join(folder, ".hydra"), ignore_errors=True)
    for name in os.listdir(folder):
        if name.endswith(".log"):
            os.unlink(os.path.join(folder, name))
    if not os.listdir(folder):
        os.rmdir(folder)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(flags, overrides) of a Hydra command line."""
    flags, overrides = [], []
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and "=" not in a:
                nxt = next(it, None)
                if nxt is not None:
                    flags.append(nxt)
        else:
            overrides.append(a)
    return flags, overrides


def is_inspecting(args: list[str]) -> bool:
    """--help, --cfg, --info …: the user asks Hydra about the config; nothing will run."""
    return any(f in _INSPECT_FLAGS for f in split_args(args)[0])


def insert_override(args: list[str], override: str) -> list[str]:
    """`args` with one more override, placed next to the others: Hydra's argument parser
    takes the overrides as one contiguous run, so appending after a flag would break."""
    it = enumerate(args)
    for i, a in it:
        if a.startswith("-"):
            if a in _VALUE_FLAGS and "=" not in a:
                next(it, None)
        else:
            return [*args[:i], override, *args[i:]]
    return [*args, override]


def groups() -> dict[str, list[str]]:
    """Config groups and their options, from conf/ (strategy: single, pipeline, …)."""
    out = {}
    for g in sorted(os.listdir(CONF_DIR)):
        d = os.path.join(CONF_DIR, g)
        if os.path.isdir(d):
            out[g] = sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _override_for(key: str, overrides: list[str]) -> str | None:
    """The override on the command line that set `key` (for naming it in a message)."""
    return next((o for o in overrides if o.lstrip("+~").partition("=")[0] == key), None)


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job of a sweep as a plain override list (Hydra's basic sweeper: the product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for o in overrides:  # one at a time, so the message names the one that is malformed
        try:
            (p,) = parser.parse_overrides([o])
        except Exception as e:  # hydra.errors.OverrideParseException
            msg = _first_line(e).removeprefix("Error parsing override ").strip()
            fail(f"{o}: malformed override ({msg}); the form is key=value")
        if not p.get_key_element().lstrip("+~"):
            fail(f"{o}: malformed override (no key before '='); the form is key=value")
        parsed.append(p)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


SWEEPS_DIR = "outputs/sweeps"


def default_sweep_dir(overrides: list[str]) -> str:
    """outputs/sweeps/<the overrides, readable>-<hash of them>.

    The same command line always lands in the same folder, so rerunning a sweep
    resumes it (jobs already `ok` are skipped). Hydra's own overrides (hydra.*,
    hydra/launcher=…) do not change what runs and are left out.
    """
    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    digest = hashlib.sha1("\0".join(plain).encode()).hexdigest()[:8]
    slug = "_".join(plain).replace("=", "-").replace(",", "+")
    slug = re.sub(r"[^A-Za-z0-9._+-]", "", slug)[:80].strip("._-") or "defaults"
    return f"{SWEEPS_DIR}/{slug}-{digest}"


def has_override(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def check_groups(overrides: list[str]) -> None:
    known = groups()
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in known and value not in known[key] and value not in ("null", ""):
            fail(f"{key}={value}: must be one of {', '.join(known[key])}")


def compose_config(overrides: list[str], *, with_hydra: bool = False) -> Any:
    """Hydra's compose API over conf/ (no folders created, nothing run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_groups(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        try:
            return compose(config_name="config", overrides=overrides,
                           return_hydra_config=with_hydra)
        except Exception as e:  # unknown keys, type errors: Hydra's first line says which
            msg = _first_line(e)
            m = re.search(r"override '([^']+)'|at '([^']+)'", msg)
            key = next((g for g in m.groups() if g), None) if m else None
            where = _override_for(key, overrides) if key else None
            if where and msg.startswith("Could not override"):
                fail(f"{where}: no such key in the config{_no_such_key_hint(key, overrides)}")
            fail(f"{where}: {msg}" if where else msg)


def _config_keys(overrides: list[str]) -> list[str]:
    """Every dotted key of the config these overrides compose (the bad one left out)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    def walk(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, dict):
            return [prefix]
        return [k for name, v in node.items() for k in walk(v, f"{prefix}{name}.")] or [prefix]

    for attempt in (overrides, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name="config", overrides=attempt)
            return [k.rstrip(".") for k in walk(OmegaConf.to_container(cfg), "")]
        except Exception:  # noqa: BLE001 - another bad override: fall back to the defaults
            continue
    return []


def _no_such_key_hint(key: str, overrides: list[str]) -> str:
    """`; did you mean train.batch_size?` for a mistyped key (difflib's close match). Hydra's
    `+key=value` hint only for keys outside the project's own sections: `+train.batchsize=5`
    would be refused in turn, since train has no such key."""
    import difflib

    key = key.lstrip("+~")
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    keys = _config_keys(rest)
    section, _, leaf = key.rpartition(".")
    siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section)
    if section and siblings:  # a known section, a mistyped key in it
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {section}.{close[0]}?"
        return f"; {section} has {', '.join(siblings)}"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not close:  # the last part alone: batchsize -> train.batch_size
        leaves = {k.rpartition(".")[2]: k for k in keys}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.8)]
    if close:
        return f"; did you mean {close[0]}?"
    sections = {k.split(".", 1)[0] for k in keys if "." in k} | set(groups())
    if key.split(".", 1)[0] in sections:
        return ""
    where = _override_for(key, overrides) or key
    return f" (to add one, use +{where.lstrip('+~')})"


def to_plain(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    """The composed config as a plain dict, interpolations resolved; a bad one ends in one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = (_override_for(key, overrides) if key else None) or key
        fail(f"{where}: {_first_line(e)}" if where else _first_line(e))


def preflight(args: list[str]) -> None:
    """Validate every job of the command line before Hydra creates any folder."""
    from partition.config import ConfigError, parse_config
    from partition.launch import check_dataset

    flags, overrides = split_args(args)
    if is_inspecting(args):
        return  # the user is asking Hydra about the config; nothing will run
    seen_data: set[tuple] = set()
    for job in expand(overrides):
        plain = [o for o in job if not o.lstrip("+~").startswith("hydra")]
        cfg = compose_config(plain)
        container = to_plain(cfg, plain)
        try:
            rc = parse_config(container)
            key = (rc.data, rc.model, rc.seed)
            if key not in seen_data:  # load each distinct dataset / init file once
                check_dataset(rc)
                seen_data.add(key)
        except ConfigError as e:
            fail(str(e))


def summary_line(result: dict[str, Any], path: str) -> str:
    """One line per finished run: what ran, how it went, where it is."""
    run, tr = result["run"], result["train"]
    what = f"{run['strategy']} P={run['ranks']} B={run['batch_size']} M={run['microbatches']}"
    if run.get("schedule"):
        what += f" {run['schedule']}"
    if run.get("layout"):
        what += f" {run['layout']}"
    if result["status"] != "ok":
        err = result.get("error") or {}
        detail = f"rank {err.get('rank')}: {err.get('type')}: {err.get('message')}" if err else ""
        return f"[{result['status']}] {what} {detail} -> {path}"
    loss = tr["loss"]
    med = tr["step_time_s"]["median"]
    # Per device: the most any rank moves per step for training; the J reduction apart.
    from partition.boundaries import describe, device_bytes

    moved = [device_bytes(r.get("comm")) for r in result["ranks"]]
    train = max((t or 0 for t, _ in moved), default=0)
    metric = max((m for _, m in moved), default=0)
    extra = f" (+{metric:,} B metric)" if metric else ""
    bounds = f"; {describe(result['boundaries'])}" if result.get("boundaries") else ""
    return (f"[ok] {what}: J {loss[0]:.4f} -> {loss[-1]:.4f}, step {med * 1e3:.1f} ms, "
            f"{train:,} B/step/device{extra}{bounds} -> {path}")
