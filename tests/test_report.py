"""jisac.report: report.html of a finished run, a run in progress and a sweep: self-contained, every class and
number present, well-formed; rendered by headless Chromium, every class image shows."""

import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from jisac import ranking, report
from jisac.io import mrc
from tests import fake_run

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
SVG_SELF_CLOSING = {"line", "rect", "circle", "polyline", "path"}


class Checker(html.parser.HTMLParser):
    """Collects images, links, ids and text; checks that every element is closed in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.images, self.links, self.ids, self.text = [], [], [], [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "a":
            self.links.append(a.get("href", ""))
        if "id" in a:
            if a["id"] in self.ids:
                self.errors.append(f"duplicate id {a['id']}")
            self.ids.add(a["id"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID and tag not in SVG_SELF_CLOSING:
            self.errors.append(f"<{tag}/> is not a void element")

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    text = path.read_text(encoding="utf-8")
    c = Checker()
    c.feed(text)
    c.close()
    assert not c.errors, c.errors[:5]
    assert c.stack == [], c.stack
    return text, c


def decode_png(uri):
    from matplotlib.image import imread

    assert uri.startswith("data:image/png;base64,")
    return imread(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])), format="png")


def assert_self_contained(text, c):
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "@import" not in text and "url(" not in text
    for img in c.images:
        assert img["src"].startswith("data:image/png;base64,"), img["src"][:40]
    for href in c.links:
        assert "://" not in href and not href.startswith("/"), href


def test_finished_run_report_has_every_class_and_number(tmp_path):
    fake_run.make_run(tmp_path, resolution=True)
    path = report.write_report(tmp_path)
    assert path == tmp_path / "report.html"
    text, c = parse(path)
    assert_self_contained(text, c)
    words = " ".join(c.text)
    avgs = [i for i in c.images if i.get("class") == "avg"]
    assert len(avgs) == 4
    for k, (members, _, err) in fake_run.CLASSES.items():
        assert f"class-{k}" in c.ids
        assert f"#{k}" in words and f"{members} members" in words
        assert f"{100 * fake_run.STABLE[k]:.1f}" in words  # table
        assert f"{err:.3f}" in words and f"{fake_run.RESOLUTION[k]:.2f}" in words
    table = ranking.class_table(tmp_path)
    for s in table["score"]:
        assert f"{s:.3f}" in words and f"score {s:.2f}" in words
    # the images are the averages, in class order (same contrast stretch as the report)
    for k, img in enumerate(avgs):
        png = decode_png(img["src"])
        assert png.shape[:2] == (fake_run.BOX, fake_run.BOX)
        expected = decode_png(report.png_data_uri(fake_run.averages()[k]))
        np.testing.assert_array_equal(png, expected)
    s = json.loads((tmp_path / "summary.json").read_text())
    for h in s["generations"]:
        for key in ("particles", "classes", "accepted_classes", "accounted", "accounted_total"):
            assert str(h[key]) in words
    assert "87/100 particles accounted (87.0 %)" in words
    for stage, sec in s["seconds"].items():
        assert stage in words and f"{sec:.2f} s" in words
    for stage, m in s["memory"]["stages"].items():
        assert stage in words and f"{m['peak_rss_mb']:.1f}" in words
    for key, value in s["parameters"].items():
        assert key in words and str(value) in words
    assert s["input"] in words
    # links: only files that exist, each described with its readers
    for name in ("class_averages.mrcs", "particles.star", "ordered_class_averages.hdf", "summary.json"):
        assert name in c.links
    assert "cli.log" not in c.links and "selected_particles.star" not in c.links
    assert all((tmp_path / href).exists() for href in c.links if not href.startswith("#"))
    assert "SPHIRE" in words and "RELION" in words and "cryoSPARC" in words
    assert "generations-plot" in c.ids and "class-table" in c.ids
    # no temporary file left behind
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_report_prefers_the_beautified_averages(tmp_path):
    fake_run.make_run(tmp_path)
    mrc.write_stack(tmp_path / "beautify" / "class_averages.mrcs", fake_run.averages(4, box=48), 2.0)
    text, c = parse(report.write_report(tmp_path))
    avgs = [i for i in c.images if i.get("class") == "avg"]
    assert [decode_png(i["src"]).shape[:2] for i in avgs] == [(48, 48)] * 4
    assert "beautify/class_averages.mrcs" in text


def test_run_in_progress(tmp_path):
    h = fake_run.make_run(tmp_path, finished=False)["history"]
    text, c = parse(report.write_report(tmp_path))
    assert_self_contained(text, c)
    words = " ".join(c.text)
    assert "in progress" in words and "87/100 particles accounted so far" in words
    assert len([i for i in c.images if i.get("class") == "avg"]) == 4
    assert {"class-g1-1", "class-g1-2", "class-g2-1", "class-g2-2"} <= c.ids
    # generation 1 had 3 classes and accepted 2, generation 2 accepted both: nothing rejected in the newest
    assert len([i for i in c.images if i.get("class") == "other"]) == 0
    assert all(str(x["accounted_total"]) in words for x in h)
    # a generation that accepts fewer than it made: its rejected averages are shown apart
    gen = tmp_path / "main001" / "generation003"
    gen.mkdir()
    mrc.write_stack(gen / "class_averages.mrcs", fake_run.averages(3))
    mrc.write_stack(gen / "good_class_averages.mrcs", fake_run.averages(3)[1:2])
    (gen / "finished").write_text(json.dumps({"generation": 3, "particles": 13, "classes": 3, "accepted_classes": 1,
                                              "accounted": 5, "accounted_total": 92}) + "\n")
    text, c = parse(report.write_report(tmp_path))
    assert len([i for i in c.images if i.get("class") == "avg"]) == 5
    assert len([i for i in c.images if i.get("class") == "other"]) == 2
    assert "92/100 particles accounted so far" in " ".join(c.text)


def test_empty_run_folder(tmp_path):
    text, c = parse(report.write_report(tmp_path))
    assert "no generation finished yet" in text and c.images == []
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        report.write_report(tmp_path / "missing")


def _make_sweep(root):
    for job, status in (("0", "ok"), ("1", "ok"), ("2", "failed")):
        folder = root / job
        (folder / ".hydra").mkdir(parents=True)
        overrides = f"- isac.img_per_grp={30 + 10 * int(job)}\n- isac.radius=12\n"
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
        if status == "ok":
            fake_run.make_run(folder)
        (folder / "status.json").write_text(json.dumps(
            {"status": status, "error": "" if status == "ok" else "isac.minimum_grp_size (60) > isac.img_per_grp (50)",
             "seconds": 12.0}))


def test_sweep_report(tmp_path):
    _make_sweep(tmp_path)
    path = report.write_sweep_report(tmp_path)
    text, c = parse(path)
    assert_self_contained(text, c)
    assert "0/report.html" in c.links and "1/report.html" in c.links and "2/report.html" not in c.links
    assert (tmp_path / "0" / "report.html").is_file() and (tmp_path / "1" / "report.html").is_file()
    thumbs = [i for i in c.images if i.get("class") == "thumb"]
    assert len(thumbs) == 8 and all(decode_png(i["src"]).shape[:2] == (32, 32) for i in thumbs)
    words = " ".join(c.text)
    assert "3 runs, 2 ok" in words and "img_per_grp (50)" in words and "isac.radius=12" in words
    for v in ("30", "40", "50", "87.0 %"):
        assert v in words
    assert report.main([str(tmp_path)]) == 0  # the command line picks the sweep report for a sweep folder


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (headless)")
def test_chromium_renders_every_class_image(tmp_path):
    """Headless Chromium screenshot of the report: not blank, and one CLASS_BORDER frame per class with the
    average (not an empty or broken image) inside."""
    from matplotlib.image import imread
    from scipy import ndimage

    fake_run.make_run(tmp_path, resolution=True)
    path = report.write_report(tmp_path)
    shot = tmp_path / "shot.png"
    env = {**os.environ, "HOME": str(tmp_path)}  # chromium writes its profile under HOME
    subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,1600", path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=60, cwd=tmp_path, env=env)
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 0.05  # not blank
    target = np.array([int(report.CLASS_BORDER[i:i + 2], 16) for i in (1, 3, 5)]) / 255.0
    frame = np.all(np.abs(img - target) < 2.5 / 255, axis=-1)
    labels, n = ndimage.label(frame)
    boxes = [b for i, b in enumerate(ndimage.find_objects(labels), 1) if (labels[b] == i).sum() > 500]
    assert len(boxes) == len(fake_run.CLASSES), f"{len(boxes)} class frames of {n} components"
    for b in boxes:
        inner = img[b[0].start + 6:b[0].stop - 6, b[1].start + 6:b[1].stop - 6]
        assert inner.shape[0] > 100 and inner.std() > 0.1, "a class frame without its image"
    # the frames are in a row, in class order, left to right
    assert sorted(b[1].start for b in boxes) == [b[1].start for b in sorted(boxes, key=lambda b: b[1].start)]


def test_report_file_is_small_and_fast(tmp_path):
    import time

    fake_run.make_run(tmp_path)
    t = time.perf_counter()
    path = report.write_report(tmp_path)
    assert time.perf_counter() - t < 5.0
    assert path.stat().st_size < 200_000
    assert re.search(r"<title>jisac run", path.read_text())
    path.unlink()
    assert report.main([str(tmp_path)]) == 0 and path.is_file()  # the command line, on a run folder
    assert report.main([str(tmp_path / "missing")]) == 2
