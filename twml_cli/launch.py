"""`twml COMMAND ... --nproc-per-node N`: the command on N processes per machine, through PyTorch's
own launcher (torch.distributed.run, the engine behind torchrun), not one of twml's own.

Why not only `torchrun -m twml_cli ...`: torchrun's parser takes any option that is a prefix
of one of its own, so `--m`, `--n` and `--run` (twml's) are grabbed before twml sees them.
Here twml strips its four launch options, builds torchrun's arguments itself (ending in
`--`, after which torchrun's parser reads nothing) and hands the rest of the command line,
untouched, to `python -m twml_cli` in every process.

One machine: `--nproc-per-node N` (a standalone rendezvous on localhost). Several: on each
machine `--nnodes M --node-rank R --rdzv-endpoint HOST:PORT` with the same HOST:PORT (node
0's address; torchrun's static rendezvous).
"""

from __future__ import annotations

import logging
import sys

LAUNCH_OPTIONS = {"--nproc-per-node": int, "--nnodes": int, "--node-rank": int, "--rdzv-endpoint": str}


def split(argv: list[str]) -> tuple[dict, list[str]]:
    """(launch options given, the rest of the command line). Accepts `--opt value` and `--opt=value`."""
    given, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in LAUNCH_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            try:
                given[name] = LAUNCH_OPTIONS[name](value)
            except ValueError:
                raise ValueError(
                    f"{name} takes {'a whole number' if LAUNCH_OPTIONS[name] is int else 'HOST:PORT'}, got '{value}'"
                ) from None
        else:
            rest.append(arg)
        i += 1
    return given, rest


def torchrun_args(options: dict, rest: list[str]) -> list[str]:
    """torchrun's command line for these launch options, running `python -m twml_cli REST`."""
    nproc, nnodes = options.get("--nproc-per-node", 1), options.get("--nnodes", 1)
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"--nproc-per-node and --nnodes must be >= 1, got {nproc} and {nnodes}")
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", "0"]
    if nnodes > 1:
        if "--rdzv-endpoint" not in options:
            raise ValueError(
                "several machines (--nnodes > 1) need --rdzv-endpoint HOST:PORT, node 0's address, on every machine"
            )
        args += ["--node-rank", str(options.get("--node-rank", 0)), "--rdzv-endpoint", options["--rdzv-endpoint"]]
    else:
        args += ["--standalone"]
    # "--": torchrun's parser would otherwise match twml's options (--m, --n, --run) against
    # prefixes of its own, even after the module name
    return [*args, "--module", "--", "twml_cli", *rest]


def launch(options: dict, rest: list[str]) -> int:
    """Run `twml REST` on the processes the options ask for; the exit code of the first that
    failed (its one-line message came from rank 0), else 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parsed = get_args_parser().parse_args(torchrun_args(options, rest))
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the workers say what went wrong, in one line
    try:
        run(parsed)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        return next((c for c in codes if c > 0), 1)
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str]) -> int | None:
    """Launch when the command line asks for more than one process; None otherwise (then the
    caller runs the command in this process, with the launch options removed)."""
    options, rest = split(argv)
    for name in ("--nproc-per-node", "--nnodes"):
        if options.get(name, 1) < 1:
            raise ValueError(f"{name} must be >= 1, got {options[name]}")
    if options.get("--node-rank", 0) < 0:
        raise ValueError(f"--node-rank must be >= 0, got {options['--node-rank']}")
    if options.get("--nproc-per-node", 1) * options.get("--nnodes", 1) <= 1:
        return None
    print(
        f"twml: launching {options.get('--nproc-per-node', 1)} processes per machine on "
        f"{options.get('--nnodes', 1)} machine(s) through torch.distributed.run",
        file=sys.stderr,
        flush=True,
    )
    return launch(options, rest)
