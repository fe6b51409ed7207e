"""Interface layer: jisac as a RELION 4/5 External job (``python -m jisac.relion_external``).

RELION's External job runs ``<executable> --o <job folder> --in_parts <particles STAR> [--j <threads>]`` followed by
the user's parameters as ``--<label> <value>`` pairs, from the project folder. This wrapper turns that call into
jisac's own command line (``--in_parts`` -> ``data.stack``, ``--o`` -> ``output_dir``, each ``--label value`` ->
the Hydra override ``label=value``, e.g. ``--isac.radius 40``; ``--j`` is RELION's thread count, which jisac does
not need), runs it, and writes ``RELION_JOB_EXIT_SUCCESS`` or ``RELION_JOB_EXIT_FAILURE`` in the job folder, which
RELION's pipeliner watches. jisac itself writes ``RELION_OUTPUT_NODES.star`` there, so the job's outputs become
typed nodes (the Class2D optimiser and data STAR files, the class averages).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_IGNORED = {"--j"}  # RELION's thread count: jisac sizes its work from hardware.* settings


def overrides(argv: list[str]) -> tuple[Path, list[str]]:
    """``(job folder, jisac command-line overrides)`` from RELION's External-job arguments; raises ``ValueError``
    naming what is missing or malformed."""
    out, stack, extra = None, None, []
    i = 0
    while i < len(argv):
        flag = argv[i]
        if not flag.startswith("--") or i + 1 >= len(argv):
            raise ValueError(f"relion_external: expected '--label value' pairs, got '{flag}' without a value")
        value = argv[i + 1]
        if flag == "--o":
            out = Path(value)
        elif flag == "--in_parts":
            stack = value
        elif flag not in _IGNORED:
            extra.append(f"{flag[2:]}={value}")
        i += 2
    if out is None or stack is None:
        raise ValueError("relion_external: RELION passes --o <job folder> and --in_parts <particles STAR>; give both "
                         "(set the External job's 'Input particles')")
    return out, [f"data.stack={stack}", f"output_dir={out}", *extra]


def main(argv: list[str] | None = None, run=subprocess.call) -> int:
    """Runs jisac for RELION; returns its exit status. ``run`` executes a command list (injectable for tests)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        out, args = overrides(argv)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for name in ("RELION_JOB_EXIT_SUCCESS", "RELION_JOB_EXIT_FAILURE"):
        (out / name).unlink(missing_ok=True)
    status = run([sys.executable, "-m", "jisac", *args])
    (out / ("RELION_JOB_EXIT_SUCCESS" if status == 0 else "RELION_JOB_EXIT_FAILURE")).touch()
    return status


if __name__ == "__main__":
    sys.exit(main())
