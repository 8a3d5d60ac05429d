"""One run (or a Hydra multirun sweep) of the seed MLP under a partitioning strategy.

    python -m experiments.run strategy=pipeline world_size=2 train.batch_size=1024
    python -m experiments.run -m strategy=single,pipeline,tensor,data
    torchrun --nproc_per_node=2 -m experiments.run strategy=pipeline world_size=2

Bad input ends before anything starts or is written: one line naming the key and
the value, exit status 2. A run that fails (a rank raised, died or hung) still
writes its result.json, with the root cause; the exit status is then 1.
"""

from __future__ import annotations

import os
import sys

from experiments.cli import compose_config, fail, preflight, summary_line, to_plain


def _task(cfg) -> str:  # noqa: ANN001 - a DictConfig from Hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from partition.config import ConfigError, parse_config
    from partition.launch import check_dataset, run

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        rc = parse_config(OmegaConf.to_container(cfg, resolve=True))
        check_dataset(rc)
    except ConfigError as e:
        fail(str(e), remove=run_dir)
    result = run(rc, run_dir)
    print(summary_line(result, run_dir), flush=True)
    return result["status"]


def _hydra_main() -> None:
    import hydra

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    statuses: list[str] = []

    def task(cfg) -> None:  # noqa: ANN001
        statuses.append(_task(cfg))

    hydra.main(version_base="1.3", config_path=conf, config_name="config")(task)()
    if "failed" in statuses:  # every job has run (a sweep goes on past a failure)
        sys.exit(1)


def _torchrun_main(overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from partition.config import ConfigError, parse_config
    from partition.launch import check_dataset, torchrun_rank

    rank = int(os.environ.get("RANK", "0"))
    result = None
    try:
        cfg = compose_config(overrides, with_hydra=True)
        run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        # Resolve without the hydra node: its sweep keys need a job number torchrun has not.
        container = OmegaConf.to_container(cfg, resolve=False)
        container.pop("hydra", None)
        container = to_plain(OmegaConf.create(container), overrides)
        rc = parse_config(container)
        check_dataset(rc)
        # Every rank checks; fail() lets one of them speak, so the message is printed once.
        _, result = torchrun_rank(rc, lambda: os.path.abspath(run_dir))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:
        # This rank's failure is recorded in the run folder's errors/; rank 0 has written
        # result.json with the root cause (or, failing before that, says why here).
        if rank == 0:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"error: rank 0: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        _exit_now(1)
    if result is not None:
        print(summary_line(result, result["path"]), flush=True)
        if result["status"] == "failed":
            _exit_now(1)


def _exit_now(status: int) -> None:
    """Exit without the interpreter's slow shutdown (seconds with torch on a busy machine),
    so that torchrun stops the other ranks soon after a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    from partition.launch import under_torchrun

    args = sys.argv[1:]
    if under_torchrun():
        if any(a in ("-m", "--multirun") for a in args):
            fail("--multirun: not under torchrun (each sweep job starts its own ranks)")
        _torchrun_main([a for a in args if not a.startswith("-")])
        return
    preflight(args)
    try:
        _hydra_main()
    except KeyboardInterrupt:  # the run's result.json says so; no traceback here
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
