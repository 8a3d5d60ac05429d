"""Command-line plumbing shared by the entry points: compose, pre-flight checks, one-line errors."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import sys
import tempfile
from typing import Any, NoReturn

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

# Hydra flags that take a value; everything else starting with "-" stands alone.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--info", "--config-name", "-cn",
                "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun"}
_INSPECT_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion",
                  "-sc"}
# Every flag Hydra's command line has (hydra/_internal/utils.py get_args_parser).
_KNOWN_FLAGS = _VALUE_FLAGS | _INSPECT_FLAGS | {"--version", "--resolve", "--run", "-r",
                                                "--multirun", "-m", "-i"}
_MULTIRUN_FLAGS = ("-m", "--multirun")
# Flags refused outright, and why: Hydra's rerun unpickles its FILE (which can run any code).
_REFUSED_FLAGS = {
    "--experimental-rerun": "refused: Hydra's rerun unpickles its file, which can run any "
                            "code; rerun with the overrides in <run>/.hydra/overrides.yaml",
    "--config-path": "refused: experiments.run composes conf/ only (add an option to a "
                     "group there, or use +experiment=<name>)",
    "-cp": "refused: experiments.run composes conf/ only",
    "--config-dir": "refused: experiments.run composes conf/ only (add an option to a "
                    "group there)",
    "-cd": "refused: experiments.run composes conf/ only",
}


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


def check_flags(flags: list[str]) -> None:
    """Hydra's flags, checked before Hydra parses them (its errors are several lines, and
    one flag, --experimental-rerun, unpickles a file)."""
    it = iter(flags)
    for f in it:
        name, eq, value = f.partition("=")
        if name in _VALUE_FLAGS and not eq:
            value = next(it, "")
        if name in _REFUSED_FLAGS:
            fail(f"{name}: {_REFUSED_FLAGS[name]}")
        if name not in _KNOWN_FLAGS:
            fail(f"{name}: no such option (python -m experiments.run --help lists them)")
        if name in ("--config-name", "-cn"):
            primaries = sorted(n[:-5] for n in os.listdir(CONF_DIR) if n.endswith(".yaml"))
            if value.removesuffix(".yaml") not in primaries:
                fail(f"--config-name={value}: no such config in conf/ "
                     f"(there is: {', '.join(primaries)})")


def is_multirun(args: list[str]) -> bool:
    return any(f in _MULTIRUN_FLAGS for f in split_args(args)[0])


def _project_key(key: str) -> bool:
    """A key of the project's own config (not Hydra's)."""
    return key.split(".")[0] not in ("hydra", "")


def check_overrides(overrides: list[str]) -> None:
    """What Hydra lets through but a run would quietly misread, refused in one line:

    - `~key` deletes a setting, which then silently falls back to its default;
    - `+key=value` adds a key, so a typo (`+world_sise=4`) would be ignored: only the
      project's own keys may be added (conf/ leaves some out: tools add theirs).
    """
    from partition.config import schema, unknown_key_reason

    keys = schema()
    known_groups = groups()
    for o in overrides:
        key = o.partition("=")[0]
        bare = key.lstrip("+~")
        if key.startswith("~") and _project_key(bare):
            fail(f"{o}: a setting cannot be deleted (it would silently fall back to its "
                 f"default); set it instead: {bare}=…")
        if not key.startswith("+") or not _project_key(bare) or bare in known_groups:
            continue
        section, _, rest = bare.partition(".")
        if section not in keys:
            fail(f"{o}: {unknown_key_reason(None, section)}")
        if rest and keys[section] is None:
            fail(f"{o}: no such key ({section} is a setting, not a section)")
        if rest and rest not in keys[section]:
            fail(f"{o}: {unknown_key_reason(section, rest)}")


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


def expand(overrides: list[str], *, multirun: bool = True) -> list[list[str]]:
    """Every job of a sweep as a plain override list (Hydra's basic sweeper: the product).
    Without `multirun`, a sweep value (a,b; range(…); choice(…)) is refused."""
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
        if o.is_sweep_override() and not multirun:
            bare = key.lstrip("+~")
            fail(f"{o.input_line}: a sweep over several values runs only with -m; "
                 f"for a list write {bare}=[…], for a string quote it: {bare}='…'")
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
        if key in known and value not in known[key] and value != "null":
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
                fail(f"{where}: {_no_such_key(key)}")
            fail(f"{where}: {msg}" if where else msg)


def _no_such_key(key: str) -> str:
    """Why `key` cannot be set: a close match among the project's keys, or (for a key
    outside them, which some tool may read) how Hydra adds one."""
    from partition.config import close_match, schema, unknown_key_reason

    keys = schema()
    section, _, rest = key.partition(".")
    if rest and keys.get(section) is not None:
        return unknown_key_reason(section, rest)
    # A mistyped section (tran.steps) or a key without its section (batchsize): match the
    # whole dotted key, then its last part alone.
    dotted = [f"{s}.{k}" for s, ks in keys.items() if ks for k in ks]
    dotted += [k for k, ks in keys.items() if ks is None]
    match = close_match(key, dotted)
    if match is None:
        leaves = {d.rpartition(".")[2]: d for d in dotted}
        leaf = close_match(key.rpartition(".")[2], list(leaves))
        match = leaves[leaf] if leaf else None
    if match:
        return f"no such key (did you mean {match}?)"
    return f"no such key in the config (to add one, use +{key})"


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
    check_flags(flags)
    if is_inspecting(args):
        return  # the user is asking Hydra about the config; nothing will run
    check_overrides(overrides)
    multirun = is_multirun(args)
    seen_data: set[tuple] = set()
    for num, job in enumerate(expand(overrides, multirun=multirun)):
        plain = [o for o in job if _project_key(o.lstrip("+~").partition("=")[0])]
        cfg = compose_config(plain)
        container = to_plain(cfg, plain)
        try:
            rc = parse_config(container)
            check_job_dirs(job, rc, num=num if multirun else None)
            key = (rc.data, rc.model, rc.seed, rc.train.batch_size, rc.strategy, rc.world_size)
            if key not in seen_data:  # load each distinct dataset / init file once
                check_dataset(rc)
                seen_data.add(key)
        except ConfigError as e:
            fail(str(e))


def check_job_dirs(overrides: list[str], cfg: Any, *, num: int | None) -> None:  # noqa: ANN401
    """The folders a job will write: hydra.run.dir, or (num given: job `num` of a sweep)
    hydra.sweep.dir and the job's folder in it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if num is None:
        hc = compose_config(overrides, with_hydra=True)
        check_run_dir("hydra.run.dir", _select(hc, "hydra.run.dir"), cfg)
        return
    hc = compose_config([*overrides, f"hydra.job.num={num}"], with_hydra=True)
    sweep_dir = _select(hc, "hydra.sweep.dir")
    check_run_dir("hydra.sweep.dir", sweep_dir, None)
    try:
        subdir = str(OmegaConf.select(hc, "hydra.sweep.subdir"))
    except OmegaConfBaseException:
        return  # a subdir made of runtime values: the sweep's own resume logic decides
    check_run_dir("hydra.sweep.dir", os.path.join(sweep_dir, subdir), cfg, job=subdir)


def _select(hc: Any, key: str) -> str:  # noqa: ANN401
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(hc, key)
    except OmegaConfBaseException as e:
        fail(f"{key}: {_first_line(e)}")
    return "" if value is None else str(value)


def check_run_dir(key: str, path: str, cfg: Any = None, *, job: str | None = None) -> None:  # noqa: ANN401
    """Refuse (ConfigError) a run folder that cannot hold this run: none named, a file, one
    that cannot be made or written, or one holding another run's result.json (a rerun
    of the same config may use it). `cfg` None: only whether it can be written."""
    from partition.config import ConfigError

    if not path or not path.strip():
        raise ConfigError(key, path, "must name a folder (empty would write the run into "
                                     "the current directory)")
    full = os.path.abspath(path)
    where = f"job folder {job}" if job else "the folder"
    if os.path.lexists(full) and not os.path.isdir(full):
        raise ConfigError(key, path, f"{where} is a file, not a folder" if job else
                          "is a file, not a folder")
    base = full
    while not os.path.lexists(base):  # the nearest existing folder: the run's is made there
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ConfigError(key, path, f"cannot be made: {base} is a file")
    try:  # the only sure test (root ignores modes; read-only mounts, immutable folders)
        os.rmdir(tempfile.mkdtemp(prefix=".partition-probe-", dir=base))
    except OSError as e:
        raise ConfigError(key, path, f"cannot be written: {base}: {e.strerror}") from None
    result = os.path.join(full, "result.json")
    if cfg is None or not os.path.exists(result):
        return
    from partition.sweep import same_config

    if not same_config(result, cfg):
        raise ConfigError(key, path, f"{where} holds another run's result.json: choose "
                                     f"another folder, or remove that one")


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


def load_run_config(overrides: list[str]) -> Any:
    """The RunConfig the overrides describe (as `experiments.run` would build it), or one
    line and exit 2. Hydra's own keys are left out: nothing is launched."""
    from partition.config import ConfigError, parse_config

    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    container = to_plain(compose_config(plain), plain)
    try:
        return parse_config(container)
    except ConfigError as e:
        fail(str(e))
