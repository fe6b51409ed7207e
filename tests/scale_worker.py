"""Runs a tiny ISAC (``run.run``: pre-alignment, working stack, classification, outputs) for the scale-out tests
(``tests/test_scale.py``) in a fresh process, because the device count is fixed when JAX starts:

    python tests/scale_worker.py devices DIR            4 CPU devices; runs on 1, 2 and 4 of them: DIR/d1, d2, d4,
                                                        and on 1 with the GPU's chunk sizes and budget: DIR/d1gpu
    python tests/scale_worker.py process DIR PORT I     process I of 2 (2 CPU devices each, jax.distributed on
                                                        localhost:PORT); the joint run writes DIR/p2
"""

import sys
from pathlib import Path

import jax

BOX, RADIUS = 32, 12  # tiny: each run compiles its own programs (device count, chunk sizes); compute is the rest


def make_stack(folder: Path) -> Path:
    import pandas as pd

    from jisac import synthetic
    from jisac.io.star import write_stack_and_star

    box, radius, n = BOX, RADIUS, 120  # 4 classes, ~113 particles accounted
    parts, truth = synthetic.known_view_particles(n, box, radius, n_views=4, snr=0.6)
    path = folder / "particles.star"
    if not path.exists():
        write_stack_and_star(path, folder / "particles.mrcs", parts, pd.DataFrame({"myTruth": truth}), pixel_size=1.5)
    return path


def config(stack: Path, out: Path, align=None, **hardware):
    from jisac import config as c

    isac = c.IsacConfig(radius=RADIUS, img_per_grp=30, minimum_grp_size=15, target_radius=RADIUS, target_nx=BOX,
                        maxit=6, init_iter=1, stab_ali=3, rand_seed=0, main_iter_limit=1, restart=False)
    return c.JisacConfig(output_dir=str(out), data=c.DataConfig(stack=str(stack)), isac=isac,
                         hardware=c.HardwareConfig(**hardware), align=align or c.AlignConfig(),
                         beautify=c.BeautifyConfig(enabled=False))


def main(mode: str, folder: str, *rest: str) -> None:
    folder = Path(folder)
    if mode == "devices":
        jax.config.update("jax_num_cpu_devices", 4)
        from jisac import run

        stack = make_stack(folder)
        for k in (1, 2, 4):
            run.run(config(stack, folder / f"d{k}", devices=list(range(k))))
        # the GPU presets' chunk sizes and device budget, on the CPU: chunking must not change any result
        from jisac import budget, config as c

        gpu = budget.BACKEND_PRESETS["gpu"]
        sizes = c.AlignConfig(**{name: gpu[name] for name in c.ALIGN_CHUNK_SIZES})
        run.run(config(stack, folder / "d1gpu", align=sizes, devices=[0], memory_budget_mb=gpu["memory_budget_mb"]))
    elif mode == "process":
        port, pid = rest
        jax.config.update("jax_num_cpu_devices", 2)
        from jisac import devices, run

        devices.initialize_distributed("true", f"127.0.0.1:{port}", 2, int(pid))
        assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
        stack = folder / "particles.star"
        devices.quiet_other_processes()
        # host budget of 1 MB: the working stack is memory-mapped from disk (written by process 0)
        run.run(config(stack, folder / "p2", devices="all", host_memory_budget_mb=1))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(*sys.argv[1:])
