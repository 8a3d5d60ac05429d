"""One run (or a Hydra multirun sweep) of the seed MLP under a partitioning strategy.

    python -m experiments.run strategy=pipeline world_size=2 train.batch_size=1024
    python -m experiments.run -m strategy=single,pipeline,tensor,data
    torchrun --nproc_per_node=2 -m experiments.run strategy=pipeline world_size=2

Bad input ends before anything starts or is written: one line naming the key and
the value, exit status 2. A run that fails (a rank raised, died or hung) still
writes its result.json, with the root cause; the exit status is then 1. A multirun
lands in outputs/sweeps/<overrides>-<hash> (or hydra.sweep.dir), so running it again
skips the jobs already `ok`; a job that fails is recorded in its result.json and the
sweep goes on.
"""

from __future__ import annotations

import os
import sys

from experiments.cli import (
    check_overrides,
    check_run_dir,
    compose_config,
    default_sweep_dir,
    expand,
    fail,
    has_override,
    insert_override,
    is_inspecting,
    is_multirun,
    preflight,
    split_args,
    summary_line,
    to_plain,
)


def _task(cfg) -> str:  # noqa: ANN001 - a DictConfig from Hydra
    """One job; returns its status for the sweep callback ('skipped' if it had finished)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from partition.config import ConfigError, parse_config
    from partition.launch import check_dataset, run
    from partition.sweep import run_or_skip, skip_line

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        rc = parse_config(OmegaConf.to_container(cfg, resolve=True))
        check_dataset(rc)
    except ConfigError as e:
        if sweeping:  # the pre-flight checked every job; if one still fails, record it, go on
            return record_failed_job(run_dir, e)
        fail(str(e), remove=run_dir)
    if sweeping:
        # A sweep resumes: jobs that already finished ok are not run again, and a job
        # that fails is recorded in its result.json while the sweep goes on.
        result, skipped = run_or_skip(rc, run_dir)
        line = summary_line(result, run_dir)
        print(skip_line(line) if skipped else line, flush=True)
        return "skipped" if skipped else result["status"]
    result = run(rc, run_dir)
    print(summary_line(result, run_dir), flush=True)
    return result["status"]


def record_failed_job(run_dir: str, exc: Exception) -> str:
    """A sweep job that could not even be configured: a result.json that says so."""
    from partition.results import RESULT_FILE, write_json
    from partition.sweep import failed_result_error

    err = failed_result_error(exc)
    write_json(os.path.join(run_dir, RESULT_FILE), {"status": "failed", "error": err})
    print(f"[failed] {err['type']}: {err['message']} -> {run_dir}", flush=True)
    return "failed"


def _hydra_main() -> None:
    import hydra

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    single_run: list[str] = []

    def task(cfg) -> str:  # noqa: ANN001
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        status = _task(cfg)
        if HydraConfig.get().mode == RunMode.RUN:
            single_run.append(status)
        return status  # the sweep's progress callback counts these

    hydra.main(version_base="1.3", config_path=conf, config_name="config")(task)()
    # One run says how it ended in its exit status (docs/reliability.md); a sweep exits 0
    # and lists every job's status instead.
    if single_run:
        from partition.results import exit_status

        sys.exit(exit_status(single_run[0]))


def _torchrun_main(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from partition.config import ConfigError, parse_config
    from partition.launch import check_dataset, torchrun_rank
    from partition.results import exit_status

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = compose_config(overrides, with_hydra=True)
        run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        # Resolve without the hydra node: its sweep keys need a job number torchrun has not.
        container = OmegaConf.to_container(cfg, resolve=False)
        container.pop("hydra", None)
        container = to_plain(OmegaConf.create(container), overrides)
        rc = parse_config(container)
        check_run_dir("hydra.run.dir", run_dir, rc)
        check_dataset(rc)
        # Every rank checks; fail() lets one of them speak, so the message is printed once.
        status = torchrun_rank(rc, lambda: os.path.abspath(run_dir),
                               report=lambda r: print(summary_line(r, r["path"]), flush=True))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:
        # Failing before the folder was agreed (a peer died while starting): no folder to
        # answer in, so rank 0 says why here; every other failure is in result.json.
        if rank == 0:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"error: rank 0: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        _exit_now(1)
    if status != "ok":
        _exit_now(exit_status(status))


def _exit_now(status: int) -> None:
    """Exit without the interpreter's slow shutdown (seconds with torch on a busy machine),
    so that torchrun stops the other ranks soon after a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    args = sys.argv[1:]
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:  # = launch.under_torchrun
        # Before torch is imported: a rank must not outlive its torchrun agent.
        from partition.lifeline import die_with_parent

        die_with_parent()
        flags, overrides = split_args(args)
        if flags:
            fail(f"{flags[0]}: flags are not read under torchrun (each sweep job starts its "
                 f"own ranks: run -m without torchrun); give overrides only")
        check_overrides(overrides)
        expand(overrides, multirun=False)
        _torchrun_main(overrides)
        return
    flags, overrides = split_args(args)
    if (is_multirun(args) and not is_inspecting(args)
            and not has_override(overrides, "hydra.sweep.dir")):
        # Not Hydra's timestamped default: the same sweep must land in the same folder
        # for a rerun to skip the jobs that already finished.
        sweep_dir = f"hydra.sweep.dir='{default_sweep_dir(overrides)}'"
        args = insert_override(args, sweep_dir)
        sys.argv[1:] = args
    preflight(args)
    try:
        _hydra_main()
    except KeyboardInterrupt:  # the run's result.json says so; no traceback here
        from partition.results import INTERRUPTED_STATUS

        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_STATUS)


if __name__ == "__main__":
    main()
