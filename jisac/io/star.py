"""Formats layer: RELION STAR particle files (via ``starfile``, the teamtomo STAR reader/writer).

Read: RELION 3.0 (one particle table, optics values in each row) and 3.1+ (``data_optics`` + ``data_particles``;
optics values are merged into each particle row). ``_rlnImageName`` is ``N@path`` with N 1-based (a name without
``@`` is a single-image file, N = 1). A relative path is looked up beside the STAR file first, then in the current
working directory (RELION resolves it against the project folder, which is usually one of the two). A STAR file may
list any number of stacks. The pixel size of a 3.0 file comes from ``rlnImagePixelSize``, ``rlnPixelSize`` or
``rlnDetectorPixelSize`` (µm) × 10⁴ / ``rlnMagnification``; it is stored in ``rlnImagePixelSize``.

Write: RELION 3.1 files (``data_optics`` + ``data_particles``). Every input column with scalar values is carried
through; optics labels (``jisac.io.table.OPTICS_COLUMNS``) that are constant within each optics group go to
``data_optics``, everything else to ``data_particles``. Image paths in written files follow RELION's rule: they are
resolved against the folder the program runs in (the project folder), so :func:`portable_path` names a file
relative to the current working directory at write time (absolute when it lies outside it), and
:func:`portable_image_names` rewrites each particle's ``rlnImageName`` from the file the reader resolved it to.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from jisac.io import mrc
from jisac.io.atomic import atomic_path
from jisac.io.errors import StackError, StackFileNotFoundError, require_file
from jisac.io.table import OPTICS_COLUMNS, ParticleTable, image_names


# --------------------------------------------------------------------------------------------------- reading


def _read_blocks(path: Path) -> dict:
    try:
        return starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises many kinds; the user needs the file name and the reason
        raise StackError(f"{path}: not a readable STAR file ({type(e).__name__}: {e})") from None


def _as_frame(block) -> pd.DataFrame | None:
    """A loop block as a DataFrame; a key-value block (starfile gives a dict) as a one-row DataFrame."""
    if isinstance(block, pd.DataFrame):
        return block
    if isinstance(block, dict):
        return pd.DataFrame({k: [v] for k, v in block.items()})
    return None


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Adds each optics-group column missing from the particle rows, matched on ``rlnOpticsGroup``; keeps order."""
    if "rlnOpticsGroup" not in optics.columns:
        raise StackError(f"{path}: data_optics has no _rlnOpticsGroup column; fix the STAR file")
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise StackError(f"{path}: data_particles has no _rlnOpticsGroup column but data_optics has "
                             f"{len(optics)} groups; add _rlnOpticsGroup to the particles")
        particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
    by_group = optics.set_index("rlnOpticsGroup")
    unknown = ~particles["rlnOpticsGroup"].isin(by_group.index)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise StackError(f"{path}: data_particles row {row + 1} has _rlnOpticsGroup "
                         f"{particles['rlnOpticsGroup'].iloc[row]}, which data_optics does not define")
    merged = particles.copy()
    for column in by_group.columns:
        if column not in merged.columns:
            merged[column] = merged["rlnOpticsGroup"].map(by_group[column]).to_numpy()
    return merged


def _add_pixel_size(metadata: pd.DataFrame) -> pd.DataFrame:
    """Fills ``rlnImagePixelSize`` (Å) from RELION 3.0's columns when it is missing."""
    if "rlnImagePixelSize" in metadata.columns:
        return metadata
    if "rlnPixelSize" in metadata.columns:
        return metadata.assign(rlnImagePixelSize=metadata["rlnPixelSize"].astype(float))
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(metadata.columns):
        # RELION 3.0: detector pixel in µm, magnification dimensionless -> Å per pixel = µm * 1e4 / mag
        mag = metadata["rlnMagnification"].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            apix = metadata["rlnDetectorPixelSize"].astype(float) * 1e4 / mag
        return metadata.assign(rlnImagePixelSize=apix.where(mag > 0))
    return metadata


def _parse_image_names(names: pd.Series, path: Path) -> tuple[np.ndarray, list[str]]:
    """``N@stack`` -> (0-based indices ``(n,)``, stack path strings); names the first bad row."""
    indices = np.empty(len(names), np.int64)
    stacks = []
    for row, name in enumerate(names.astype(str)):
        number, at, stack = name.strip().partition("@")
        if not at:  # a single-image file
            number, stack = "1", number
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n < 1 or not stack:
            raise StackError(f"{path}: row {row + 1}: _rlnImageName '{name}' is not of the form N@stack.mrcs "
                             "with N >= 1; fix the STAR file")
        indices[row] = n - 1
        stacks.append(stack)
    return indices, stacks


def _resolve(stack: str, star_dir: Path) -> Path | None:
    """A referenced stack: absolute as given; relative, beside the STAR file, else in the working directory."""
    p = Path(stack)
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (star_dir, Path.cwd()):
        if (base / p).is_file():
            return (base / p).resolve()
    return None


def read_star_table(path: str | os.PathLike) -> ParticleTable:
    """Reads a RELION 3.0 or 3.1+ particle STAR file into a :class:`ParticleTable` (see the module docstring)."""
    path = Path(path)
    require_file(path, "STAR file")
    blocks = {name: _as_frame(b) for name, b in _read_blocks(path).items()}
    blocks = {name: b for name, b in blocks.items() if b is not None}
    if "particles" in blocks and "rlnImageName" in blocks["particles"].columns:
        particles = blocks["particles"]
    else:
        with_names = [b for b in blocks.values() if "rlnImageName" in b.columns]
        if not with_names:
            raise StackError(f"{path}: no table has an _rlnImageName column, so there are no particle images to "
                             "read; give a particle STAR file (e.g. RELION Extract's particles.star)")
        particles = with_names[0]
    particles = particles.reset_index(drop=True)
    if "optics" in blocks and blocks["optics"] is not particles:
        particles = _merge_optics(particles, blocks["optics"], path)
    if "rlnOpticsGroup" not in particles.columns:
        particles = particles.assign(rlnOpticsGroup=1)
    particles = _add_pixel_size(particles)

    indices, stacks = _parse_image_names(particles["rlnImageName"], path)
    unique, first, file_of = np.unique(np.asarray(stacks, dtype=object), return_index=True, return_inverse=True)
    files = [None] * len(unique)
    for k in np.argsort(first):  # in order of first use, so the message names the first bad row
        stack, row = unique[k], int(first[k])
        resolved = _resolve(stack, path.parent)
        if resolved is None:
            raise StackFileNotFoundError(
                f"{path}: row {row + 1} (_rlnImageName {particles['rlnImageName'].iloc[row]}): stack '{stack}' not "
                f"found beside the STAR file ({path.parent.resolve()}) or in the working directory ({Path.cwd()}); "
                "run from the folder the STAR paths are relative to, or fix the paths")
        files[k] = resolved
    rows = np.arange(1, len(particles) + 1)
    return ParticleTable(particles, tuple(files), file_of.astype(np.int64), indices, rows, path)


# --------------------------------------------------------------------------------------------------- writing


def _is_scalar_column(values: pd.Series) -> bool:
    if values.dtype != object:
        return True
    return not any(isinstance(v, (list, tuple, np.ndarray, np.void, dict)) for v in values)


# Optics values RELION requires in every optics group; used only when the input has none (no defocus either).
_OPTICS_PLACEHOLDERS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}


def split_optics(metadata: pd.DataFrame, *, pixel_size: float | None = None, box_size: int | None = None):
    """Splits a per-particle table into RELION 3.1's ``(optics, particles)`` tables.

    Adds what RELION 3.1 requires when missing: ``rlnOpticsGroup`` (1), ``rlnOpticsGroupName``
    (``opticsGroup<k>``), ``rlnImagePixelSize`` (``pixel_size``, Å), ``rlnImageSize`` (``box_size``, px) and
    ``rlnImageDimensionality`` (2), and ``rlnVoltage`` (300 kV), ``rlnSphericalAberration`` (2.7 mm) and
    ``rlnAmplitudeContrast`` (0.1) when the table has none: RELION 3.1's ObservationModel refuses an optics group
    without them (``relion_image_handler`` then fails with "trying to read image with empty file name"), even
    for particles that carry no defocus, whose CTF nothing computes. Columns whose cells are arrays are dropped
    (STAR holds scalars)."""
    table = metadata[[c for c in metadata.columns if _is_scalar_column(metadata[c])]].copy()
    if "rlnOpticsGroup" not in table.columns:
        table["rlnOpticsGroup"] = 1
    table["rlnOpticsGroup"] = table["rlnOpticsGroup"].astype(int)
    if "rlnOpticsGroupName" not in table.columns:
        table["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in table["rlnOpticsGroup"]]
    if "rlnImagePixelSize" not in table.columns and pixel_size is not None:
        table["rlnImagePixelSize"] = float(pixel_size)
    if "rlnImageSize" not in table.columns and box_size is not None:
        table["rlnImageSize"] = int(box_size)
    if "rlnImageDimensionality" not in table.columns:
        table["rlnImageDimensionality"] = 2
    for column, value in _OPTICS_PLACEHOLDERS.items():
        if column not in table.columns:
            table[column] = value
    grouped = table.groupby("rlnOpticsGroup", sort=True)
    optics_columns = [c for c in OPTICS_COLUMNS if c in table.columns
                      and bool((grouped[c].nunique(dropna=False) <= 1).all())]
    optics = grouped[optics_columns].first().reset_index()
    particles = table.drop(columns=optics_columns)
    return optics, particles


def _with_new_columns(metadata: pd.DataFrame | None, new_columns, n: int | None) -> pd.DataFrame:
    table = pd.DataFrame(index=range(n)) if metadata is None else metadata.reset_index(drop=True).copy()
    if new_columns is not None:
        new = pd.DataFrame(new_columns).reset_index(drop=True)
        if len(new) != len(table):
            raise StackError(f"new columns have {len(new)} rows but the metadata has {len(table)}; give one value "
                             "per particle")
        for column in new.columns:
            table[column] = new[column].to_numpy()
    return table


def write_particle_star(path: str | os.PathLike, metadata: pd.DataFrame, new_columns=None, *,
                        pixel_size: float | None = None, box_size: int | None = None) -> None:
    """Writes a RELION 3.1 particle STAR file, atomically.

    metadata:    one row per particle (e.g. ``ParticleStack.metadata``); all scalar columns are carried through.
    new_columns: a dict of ``(n,)`` arrays or a DataFrame of n rows, added (or replacing) by column name.
    pixel_size, box_size: Å and px, used when the table lacks ``rlnImagePixelSize`` / ``rlnImageSize``."""
    table = _with_new_columns(metadata, new_columns, None)
    optics, particles = split_optics(table, pixel_size=pixel_size, box_size=box_size)
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": particles}, tmp)


def portable_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` as RELION should see it from ``base`` (default: the current working directory, RELION's project
    folder): relative when it lies inside ``base``, absolute otherwise (a ``../`` path breaks as soon as the
    project folder is moved or linked elsewhere)."""
    target = Path(path).resolve()
    root = Path.cwd().resolve() if base is None else Path(base).resolve()
    return str(target.relative_to(root)) if target.is_relative_to(root) else str(target)


def portable_image_names(files, file_of, index_in_file, base: str | os.PathLike | None = None) -> list[str]:
    """``N@path`` names (N 1-based) for particles whose image is ``index_in_file[i]`` (0-based) of
    ``files[file_of[i]]`` (resolved paths, as :class:`jisac.io.table.ParticleTable` holds them), each path made
    :func:`portable_path` from ``base``."""
    names = [portable_path(f, base) for f in files]
    return image_names(index_in_file, [names[k] for k in np.asarray(file_of, np.int64)])


def write_stack_and_star(star_path: str | os.PathLike, stack_path: str | os.PathLike, images,
                         metadata: pd.DataFrame | None = None, new_columns=None, *,
                         pixel_size: float = 1.0) -> None:
    """Writes ``(n, ny, nx)`` images to an MRCS stack and a RELION 3.1 STAR file that lists them as
    ``N@<stack path relative to the STAR file's folder>``; ``metadata`` (n rows) and ``new_columns`` are carried
    into the STAR file as in :func:`write_particle_star` (``rlnImageName`` is replaced). ``pixel_size`` in Å."""
    images = np.asarray(images, np.float32)
    if images.ndim != 3:
        raise StackError(f"{stack_path}: images must be (n, ny, nx), got shape {images.shape}")
    star_path, stack_path = Path(star_path), Path(stack_path)
    table = _with_new_columns(metadata, new_columns, len(images))
    if len(table) != len(images):
        raise StackError(f"{star_path}: metadata has {len(table)} rows for {len(images)} images; give one row per "
                         "image")
    relative = os.path.relpath(stack_path.resolve(), star_path.resolve().parent)
    table["rlnImageName"] = image_names(range(len(images)), [relative] * len(images))
    table["rlnImagePixelSize"] = float(pixel_size)
    table["rlnImageSize"] = int(images.shape[-1])
    mrc.write_stack(stack_path, images, pixel_size)
    write_particle_star(star_path, table)
