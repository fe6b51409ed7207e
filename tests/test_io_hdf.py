"""EMAN2/SPHIRE HDF stacks: the layout written, read back with members/n_objects and CTF."""

import h5py
import numpy as np
import pytest

from jisac.io import open_stack
from jisac.io.hdf import parse_eman2_ctf, read_hdf_headers, write_class_averages, write_hdf_stack


def _images(n, box=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def test_class_averages_layout_and_round_trip(tmp_path):
    averages = _images(4)
    members = [[0, 5, 9], [1], [2, 3, 4, 6, 7], [8, 10]]
    path = tmp_path / "class_averages.hdf"
    write_class_averages(path, averages, members, pixel_size_angst=3.2)

    with h5py.File(path, "r") as f:  # EMAN2's layout, checked directly
        group = f["MDF/images"]
        assert int(np.asarray(group.attrs["imageid_max"]).reshape(-1)[0]) == 3
        assert sorted(group.keys(), key=int) == ["0", "1", "2", "3"]
        image = group["2/image"]
        assert image.dtype == np.float32 and image.shape == (16, 16)
        attrs = group["2"].attrs
        assert attrs["EMAN.members"].dtype == np.int32
        np.testing.assert_array_equal(attrs["EMAN.members"], [2, 3, 4, 6, 7])
        assert int(np.asarray(attrs["EMAN.n_objects"]).reshape(-1)[0]) == 5
        for axis in "xyz":
            assert float(np.asarray(attrs[f"EMAN.apix_{axis}"]).reshape(-1)[0]) == pytest.approx(3.2)

    headers = read_hdf_headers(path)
    assert [list(h["members"]) for h in headers] == members
    assert [h["n_objects"] for h in headers] == [3, 1, 5, 2]
    assert headers[0]["apix_x"] == 3.2  # float32's shortest decimal

    with open_stack(path) as stack:
        assert stack.shape == (4, 16, 16) and stack.pixel_size == pytest.approx(3.2)
        np.testing.assert_array_equal(stack[:], averages)
        np.testing.assert_array_equal(stack[[3, 1]], averages[[3, 1]])
        assert [list(m) for m in stack.metadata["EMAN.members"]] == members
        assert list(stack.metadata["EMAN.n_objects"]) == [3, 1, 5, 2]


def test_hdf_headers_types_and_ctf(tmp_path):
    ctf = "E2.5 0.2 30 50 10 300 2.7 1.5 0.01 3,1,2,3 2,0.5,0.25"
    headers = [{"ctf": ctf, "flag": True, "ptcl_source_image": "mic1.mrc", "weights": [0.5, 1.5]},
               {"ctf": ctf, "flag": False, "ptcl_source_image": "mic2.mrc", "weights": [2.5, 1.0]}]
    path = tmp_path / "particles.hdf"
    write_hdf_stack(path, _images(2), 1.5, headers)
    back = read_hdf_headers(path)
    assert back[0]["flag"] is True and back[1]["flag"] is False
    assert back[1]["ptcl_source_image"] == "mic2.mrc" and back[0]["ctf"] == ctf
    np.testing.assert_allclose(back[1]["weights"], [2.5, 1.0])
    with open_stack(path) as stack:
        md = stack.metadata
        np.testing.assert_allclose(md["rlnDefocusU"], 24000.0)  # (2.5 - 0.2/2) µm: SPHIRE's convention
        np.testing.assert_allclose(md["rlnDefocusV"], 26000.0)
        np.testing.assert_allclose(md["rlnDefocusAngle"], 15.0)  # 45 - dfang
        assert "rlnPhaseShift" not in md.columns
        np.testing.assert_allclose(md["rlnAmplitudeContrast"], 0.1)
        np.testing.assert_allclose(md["rlnVoltage"], 300.0)
        np.testing.assert_allclose(md["rlnSphericalAberration"], 2.7)


def test_parse_eman2_ctf_rejects_other_strings():
    assert parse_eman2_ctf("O2.5 0 0 0 0 0 0 0") is None  # EMAN1 CTF: not read
    assert parse_eman2_ctf("E1 2 3") is None
    assert parse_eman2_ctf("hello") is None
    assert parse_eman2_ctf(None) is None
    assert parse_eman2_ctf("E1.0 0 0 0 7 200 2 1.0 0 0")["rlnAmplitudeContrast"] == pytest.approx(0.07)


def test_hdf_without_ctf_has_no_ctf_columns(tmp_path):
    path = tmp_path / "plain.hdf"
    write_hdf_stack(path, _images(3), 1.0)
    with open_stack(path) as stack:
        assert "rlnDefocusU" not in stack.metadata.columns


def test_star_from_hdf_metadata_drops_array_columns(tmp_path):
    """HDF headers carry through to STAR as scalar columns; array cells (EMAN.members) are left out."""
    import starfile

    from jisac.io import star

    write_class_averages(tmp_path / "c.hdf", _images(2), [[], [4, 7]], 2.0)
    with open_stack(tmp_path / "c.hdf") as stack:
        assert list(stack.metadata["EMAN.members"].iloc[0]) == [] and stack.metadata["EMAN.n_objects"][0] == 0
        star.write_particle_star(tmp_path / "c.star", stack.metadata, box_size=stack.box_size)
    particles = starfile.read(tmp_path / "c.star", always_dict=True)["particles"]
    assert "EMAN.members" not in particles.columns and list(particles["EMAN.n_objects"]) == [0, 2]


# --------------------------------------------------------------------------------------------------- SPHIRE's CTF


def _sparx_wavelength(voltage_kv):
    """SPARX's electron wavelength in Å (sp_morphology / Util::tf): 12.398 / sqrt(V (1022 + V)), V in kV."""
    return 12.398 / np.sqrt(voltage_kv * (1022.0 + voltage_kv))


def _relion_wavelength(voltage_kv):
    """RELION's (and jisac.ctf's) wavelength in Å, in float64."""
    volts = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def _sphire_ctf_2d(defocus_um, dfdiff_um, dfang_deg, ampcont_pct, voltage_kv, cs_mm, apix, n, wavelength):
    """SPHIRE's 2D CTF (SPARX Util::ctf_img with Util::tf, sign +1, no B-factor as in its phase flip), float64, on
    the unshifted fft2 grid of an (n, n) image: Δz(θ) = defocus − dfdiff/2 sin 2(θ + dfang) in µm, θ from the
    x (column) axis towards y (rows), phase atan(w / sqrt(1 − w²)) for w = ampcont/100 ≥ 0 and π + that for w < 0
    (SPHIRE's VPP encoding)."""
    kx = np.fft.fftfreq(n)[None, :] / apix
    ky = np.fft.fftfreq(n)[:, None] / apix
    k2 = kx ** 2 + ky ** 2
    theta = np.arctan2(ky, kx)
    dz = defocus_um - dfdiff_um / 2 * np.sin(2 * (theta + np.radians(dfang_deg)))
    w = ampcont_pct / 100.0
    phase = np.arctan(w / np.sqrt(1 - w * w)) + (np.pi if w < 0 else 0.0)
    lam = wavelength
    return np.sin(np.pi * (dz * 1e4 * lam * k2 - cs_mm * 1e7 * lam ** 3 * k2 ** 2 / 2) + phase)


# (defocus µm, dfdiff µm, dfang °, ampcont %): astigmatic at several axes, a strong amplitude contrast, and two VPP
# phases above 90° (negative ampcont in SPHIRE's encoding)
_SPHIRE_CASES = [(1.8, 0.3, 10.0, 10.0), (2.2, 0.25, 67.5, 7.0), (1.5, 0.4, -30.0, 10.0), (2.6, 0.2, 123.0, 70.0),
                 (0.8, 0.1, 40.0, -30.0), (1.2, 0.05, 0.0, -95.0)]
_VOLTAGE, _CS, _APIX, _BOX = 300.0, 2.7, 2.0, 48


def _sphire_stack(tmp_path, fitted=False):
    extra = "3,1,2,3 2,0.5,0.25" if fitted else "0 0"
    headers = [{"ctf": f"E{d} {dd} {a} 0 {w} {_VOLTAGE} {_CS} {_APIX} 0 {extra}"} for d, dd, a, w in _SPHIRE_CASES]
    path = tmp_path / "sphire.hdf"
    write_hdf_stack(path, _images(len(headers), box=_BOX), _APIX, headers)
    return path


def _jisac_ctf(metadata):
    from jisac.ctf import CTFParams, ctf_2d

    return np.asarray(ctf_2d(CTFParams.from_relion_table(metadata), _BOX, _BOX, full=True), np.float64)


def test_sphire_ctf_convention_matches_sphire_formula(tmp_path):
    """jisac's CTF from the converted RELION columns equals SPHIRE's CTF from the HDF fields (same wavelength
    constants on both sides: the conversion, not the physics constants, is under test), to 1e-4."""
    with open_stack(_sphire_stack(tmp_path)) as stack:
        ours = _jisac_ctf(stack.metadata)
    for k, (d, dd, a, w) in enumerate(_SPHIRE_CASES):
        theirs = _sphire_ctf_2d(d, dd, a, w, _VOLTAGE, _CS, _APIX, _BOX, _relion_wavelength(_VOLTAGE))
        np.testing.assert_allclose(ours[k], theirs, atol=1e-4, err_msg=f"case {k}: {_SPHIRE_CASES[k]}")
        # and the phase flip agrees everywhere the CTF is not within 1e-3 of a zero
        clear = np.abs(theirs) > 1e-3
        assert (np.sign(ours[k])[clear] == np.sign(theirs)[clear]).all()


def test_sphire_ctf_with_sparx_wavelength_differs_only_by_the_wavelength(tmp_path):
    """With SPARX's own wavelength the two differ by at most the phase change the 2.5e-5 wavelength difference
    makes (bounded pointwise), plus 1e-4."""
    with open_stack(_sphire_stack(tmp_path)) as stack:
        ours = _jisac_ctf(stack.metadata)
    lam_s, lam_r = _sparx_wavelength(_VOLTAGE), _relion_wavelength(_VOLTAGE)
    assert abs(lam_s - lam_r) / lam_r < 5e-5
    k2 = (np.fft.fftfreq(_BOX)[None, :] ** 2 + np.fft.fftfreq(_BOX)[:, None] ** 2) / _APIX ** 2
    for k, (d, dd, a, w) in enumerate(_SPHIRE_CASES):
        theirs = _sphire_ctf_2d(d, dd, a, w, _VOLTAGE, _CS, _APIX, _BOX, lam_s)
        bound = np.pi * ((d + dd) * 1e4 * k2 * abs(lam_s - lam_r)
                         + _CS * 1e7 * k2 ** 2 / 2 * abs(lam_s ** 3 - lam_r ** 3))
        assert (np.abs(ours[k] - theirs) <= bound + 1e-4).all()


def test_sphire_conversion_values_and_vpp(tmp_path):
    with open_stack(_sphire_stack(tmp_path)) as stack:
        md = stack.metadata
    np.testing.assert_allclose(md["rlnDefocusU"].iloc[0], 16500.0)  # (1.8 - 0.3/2) µm
    np.testing.assert_allclose(md["rlnDefocusV"].iloc[0], 19500.0)
    np.testing.assert_allclose(md["rlnDefocusAngle"].iloc[0], 35.0)  # 45 - 10: the larger defocus V at 125°
    # VPP: ampcont -30 % -> total phase 180 - asin(0.3) = 162.54°, carried in rlnPhaseShift with no amplitude term
    np.testing.assert_allclose(md["rlnPhaseShift"].iloc[4], 180 - np.degrees(np.arcsin(0.3)))
    np.testing.assert_allclose(md["rlnAmplitudeContrast"].iloc[4], 0.0)
    np.testing.assert_allclose(md["rlnPhaseShift"].iloc[:4], 0.0)
    np.testing.assert_allclose(md["rlnAmplitudeContrast"].iloc[3], 0.7)
    assert np.isfinite(md[["rlnAmplitudeContrast", "rlnPhaseShift"]].to_numpy(float)).all()


def test_eman2_fitted_ctf_warns_which_convention(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="jisac"):
        open_stack(_sphire_stack(tmp_path)).close()
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="jisac"):
        open_stack(_sphire_stack(tmp_path, fitted=True)).close()
    assert len(caplog.records) == 1 and "SPHIRE's convention" in caplog.records[0].getMessage()


# --------------------------------------------------------------------------------------------------- compressed


def _write_eman2_compressed(path, images, bits, sigmas=3.0):
    """Writes ``images`` in EMAN2's compressed HDF layout (libEM/io/hdfio2.cpp, restated): per image, codes
    round((x - min)/(max - min)(2^bits - 1)) clipped to [0, 2^bits - 1], stored as uint8 (bits <= 8) or uint16 in
    a chunked, deflated dataset, with EMAN.stored_rendermin/max (float32), stored_renderbits and stored_truncated
    (int32). min/max = mean -/+ sigmas * std, so a few pixels are clipped as in EMAN2's default. Returns the
    (min, max) used per image."""
    top = (1 << bits) - 1
    limits = []
    with h5py.File(path, "w") as f:
        group = f.create_group("MDF/images")
        group.attrs.create("imageid_max", np.array([len(images) - 1], np.int32))
        for i, image in enumerate(images):
            lo = np.float32(image.mean() - sigmas * image.std())
            hi = np.float32(image.mean() + sigmas * image.std())
            scaled = (image.astype(np.float64) - lo) / (float(hi) - float(lo)) * top
            codes = np.clip(np.round(scaled), 0, top).astype(np.uint8 if bits <= 8 else np.uint16)
            g = group.create_group(str(i))
            g.create_dataset("image", data=codes, chunks=image.shape, compression="gzip", compression_opts=1)
            g.attrs.create("EMAN.stored_rendermin", np.array([lo], np.float32))
            g.attrs.create("EMAN.stored_rendermax", np.array([hi], np.float32))
            g.attrs.create("EMAN.stored_renderbits", np.array([bits], np.int32))
            g.attrs.create("EMAN.stored_truncated", np.array([int(((image <= lo) | (image >= hi)).sum())], np.int32))
            g.attrs.create("EMAN.apix_x", np.array([1.3], np.float32))
            limits.append((float(lo), float(hi)))
    return limits


@pytest.mark.parametrize("bits", [5, 8, 12])
def test_eman2_compressed_stack_is_decoded(tmp_path, bits):
    original = _images(5, box=24, seed=bits)
    path = tmp_path / "compressed.hdf"
    limits = _write_eman2_compressed(path, original, bits)
    with open_stack(path) as stack:
        decoded = stack[:]
        assert stack.pixel_size == pytest.approx(1.3)
    assert decoded.dtype == np.float32
    for image, back, (lo, hi) in zip(original, decoded, limits):
        step = (hi - lo) / ((1 << bits) - 1)
        inside = (image > lo) & (image < hi)
        assert inside.mean() > 0.95
        np.testing.assert_array_less(np.abs(back - image)[inside], step / 2 * (1 + 1e-4) + 1e-6)
        np.testing.assert_allclose(back[image <= lo], lo, rtol=1e-6)
        np.testing.assert_allclose(back[image >= hi], hi, rtol=1e-6)


def test_compressed_without_limits_is_refused(tmp_path):
    from jisac.io import StackError

    path = tmp_path / "broken.hdf"
    _write_eman2_compressed(path, _images(2), 8)
    with h5py.File(path, "r+") as f:
        del f["MDF/images/1"].attrs["EMAN.stored_rendermax"]
    with open_stack(path) as stack:
        stack[0]
        with pytest.raises(StackError, match="stored_rendermin/stored_rendermax"):
            stack[1]
