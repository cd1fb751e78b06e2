"""The image-folder source (tasks/sources/image_folder.py): PNG/JPEG/NIfTI/NRRD images and masks, manifest labels and
patient ids, splits/train{k}.txt + val{k}.txt, and every way a file or a mask can fail (quarantined with its reason,
the image kept where only its mask is wrong). Folders are built in tmp_path; the last test reads the real BUSI copy."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.config import load_params
from tasks.sources.image_folder import collect, collect_folder

REPO = Path(__file__).resolve().parents[1]
BUSI = REPO.parent / "shared" / "data" / "busi"
H, W = 12, 16


def _ip(**overrides):
    """The real params.yaml's ingest group as an image-folder source with one mask class, plus ``overrides``."""
    base = {"ingest.source": "image_folder", "ingest.labels_csv": None, "ingest.masks.classes": ["lesion"]}
    return load_params(REPO / "params.yaml", {**base, **{f"ingest.{k}": v for k, v in overrides.items()}}).ingest


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _gray(seed: int, shape: tuple[int, ...] = (H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, size=shape, dtype=np.uint8)


def _blob(value: int = 255, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[3:7, 4:9] = value
    return m


def _by_rel(got) -> tuple[dict[str, object], dict[str, tuple[str, str]]]:
    """Images by their image file's relative path; quarantine rows by their file's relative path."""
    images = {got.paths[im.files[0]]: im for im in got.images}
    quarantined = {got.paths[f]: (reason, detail) for f, reason, detail in got.quarantine}
    return images, quarantined


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    """a: good mask; b: mask of the wrong size; c: {0, 128}; d: labels 0..3; e: empty mask; f: no mask;
    bad: a corrupt PNG (with a mask); masks/orphan.png; manifest with labels, patient_id (a and b one patient),
    a row without an image; splits 1 (x is in neither split file)."""
    root = tmp_path / "folder"
    for i, name in enumerate("abcdefx"):
        _png(root / "images" / f"{name}.png", _gray(i))
    (root / "images" / "bad.png").write_bytes((root / "images" / "a.png").read_bytes()[:60])
    _png(root / "masks" / "a.png", _blob())
    _png(root / "masks" / "b.png", _blob(shape=(10, 10)))
    _png(root / "masks" / "c.png", _blob(128))
    three = _blob(1)
    three[8:10, 10:14] = 2
    three[0, 0] = 3
    _png(root / "masks" / "d.png", three)
    _png(root / "masks" / "e.png", np.zeros((H, W)))
    _png(root / "masks" / "bad.png", _blob())
    _png(root / "masks" / "orphan.png", _blob())
    rows = [("a", "benign", "p1"), ("b", "malignant", "p1"), ("c", "benign", "p2"), ("d", "malignant", ""),
            ("e", "benign", "p5"), ("f", "", "p6"), ("x", "benign", "p7"), ("bad", "benign", "p8"),
            ("ghost", "malignant", "p9")]  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("id", "label", "patient_id"), *rows])
    (root / "splits").mkdir()
    (root / "splits" / "train1.txt").write_text("a\nb\nc\nd\n\n")
    (root / "splits" / "val1.txt").write_text("e\nf\nbad\nghost\n")
    return root


def test_png_folder_masks_labels_and_quarantine(png_folder: Path) -> None:
    got = collect_folder(png_folder, _ip(), progress=False)
    images, quarantined = _by_rel(got)

    # every file is used or quarantined exactly once: what ingest's summary checks
    used = {f for im in got.images for f in im.files}
    assert got.n_found == 15 == len(used) + len(got.quarantine)
    assert not used & {f for f, _, _ in got.quarantine}

    assert set(images) == {f"images/{n}.png" for n in "abcdefx"}
    assert quarantined["images/bad.png"][0] == "unreadable"
    assert quarantined["masks/bad.png"][0] == "mask_orphan"  # its image was quarantined
    assert quarantined["masks/orphan.png"][0] == "mask_orphan"
    reason, detail = quarantined["masks/b.png"]
    assert reason == "mask_geometry" and "size 10x10 vs image 12x16" in detail
    assert images["images/b.png"].mask is None and images["images/b.png"].mask_source == ""  # image kept

    a = images["images/a.png"]
    assert a.pixels.dtype == np.uint8 and a.pixels.shape == (H, W) and a.unit == "uint8" and a.channels == 1
    np.testing.assert_array_equal(a.pixels, _gray(0))
    np.testing.assert_array_equal(a.mask, _blob(1))  # {0, 255} -> {0, 1}
    assert a.mask_source == "PNG" and a.geometry == {"format": "PNG", "size": [H, W]} and a.notes == []
    assert len(a.files) == 2

    def notes(name: str) -> str:
        return "; ".join(images[f"images/{name}.png"].notes)

    assert "labels outside the class list: [128]" in notes("c")
    assert "non-binary values" in notes("d") and "labels outside the class list: [2, 3]" in notes("d")
    assert set(np.unique(images["images/d.png"].mask)) == {0, 1}
    assert "empty mask" in notes("e")
    assert images["images/f.png"].mask is None and notes("f") == ""

    # labels: the sorted distinct names; an empty cell is unlabelled
    assert got.class_names == ["benign", "malignant"]
    assert [images[f"images/{n}.png"].label for n in "abcdef"] == [0, 1, 0, 1, 0, None]
    assert any("['benign', 'malignant']" in w for w in got.warnings)
    assert any("1 id(s) of manifest.csv have no image" in w for w in got.warnings)
    # patients: pseudonyms of the manifest's patient_id (a and b one patient); d (empty cell) is its own
    assert images["images/a.png"].patient_id == images["images/b.png"].patient_id
    assert len({im.patient_id for im in got.images}) == 6
    assert got.patient_id_from[images["images/d.png"].image_id] == "file"
    assert got.patient_id_from[images["images/a.png"].image_id] == "PatientID"
    # nothing in the records names a file or a patient as given
    for im in got.images:
        assert im.image_id.startswith("I") and im.patient_id.startswith("P") and im.study_id.startswith("S")
        assert all(f.startswith("F") for f in im.files)
        assert "p1" not in im.patient_id and im.split == ""
    assert all(f.startswith("F") and "orphan" not in d for f, _, d in got.quarantine)

    # the same run again: the same pseudonyms (deterministic)
    again = collect_folder(png_folder, _ip(), progress=False)
    assert [im.image_id for im in again.images] == [im.image_id for im in got.images]


def test_folder_split(png_folder: Path) -> None:
    got = collect_folder(png_folder, _ip(folder_split=1), progress=False)
    images, quarantined = _by_rel(got)
    assert {rel: im.split for rel, im in images.items()} == {
        "images/a.png": "", "images/b.png": "", "images/c.png": "", "images/d.png": "",
        "images/e.png": "test", "images/f.png": "test",
    }  # fmt: skip
    assert (
        "images/x.png" not in quarantined and got.n_found == 13
    )  # x and masks/orphan: in neither split file, not counted
    assert any("1 image(s) and 1 mask(s) whose id is in neither" in w for w in got.warnings)
    assert any("1 id(s) of splits/train1.txt + val1.txt have no image" in w for w in got.warnings)

    with pytest.raises(ValueError, match=r"splits/train2\.txt: split file not found"):
        collect_folder(png_folder, _ip(folder_split=2), progress=False)
    (png_folder / "splits" / "val1.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"val1\.txt:1: id also in splits/train1\.txt"):
        collect_folder(png_folder, _ip(folder_split=1), progress=False)


def test_class_names_given(png_folder: Path) -> None:
    n, records, _, _ = collect(png_folder, _ip(), progress=False, class_names=["malignant", "benign"])
    assert n == 15 and Counter(r.label for r in records) == Counter({1: 4, 0: 2, None: 1})
    with (png_folder / "manifest.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(("zz", "cyst", ""))
    with pytest.raises(ValueError, match=r"manifest\.csv:11: label 'cyst' is neither one of base\.class_names"):
        collect(png_folder, _ip(), progress=False, class_names=["malignant", "benign"])


@pytest.mark.parametrize(
    ("manifest", "error"),
    [
        ("name,label\na,0\n", r"manifest\.csv: needs an 'id' column"),
        ("id,label\na,0\na,1\n", r"manifest\.csv:3: id repeated \(first on line 2\)"),
    ],
)
def test_bad_manifest(tmp_path: Path, manifest: str, error: str) -> None:
    _png(tmp_path / "images" / "a.png", _gray(0))
    (tmp_path / "manifest.csv").write_text(manifest)
    with pytest.raises(ValueError, match=error):
        collect(tmp_path, _ip(), progress=False)


def test_no_manifest_no_masks_integer_labels(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "images" / f"im{i}.png", _gray(i))
    got = collect_folder(tmp_path, _ip(), progress=False)
    assert got.n_found == 3 and len(got.images) == 3 and got.class_names is None
    assert all(im.label is None and im.mask is None for im in got.images)
    assert len({im.patient_id for im in got.images}) == 3
    assert any("3 image(s) without a manifest patient_id" in w for w in got.warnings)

    (tmp_path / "manifest.csv").write_text("id,label\nim0,1\nim1,0\n")  # integer labels; im2 has no row
    got = collect_folder(tmp_path, _ip(), progress=False)
    images, quarantined = _by_rel(got)
    assert got.class_names is None and images["images/im0.png"].label == 1 and images["images/im1.png"].label == 0
    assert list(quarantined) == ["images/im2.png"] and quarantined["images/im2.png"][0] == "no_label"
    assert "no row for this image's id" in quarantined["images/im2.png"][1]

    with pytest.raises(FileNotFoundError, match="no images folder"):
        collect(tmp_path / "images", _ip(), progress=False)


def test_colour_and_odd_files(tmp_path: Path) -> None:
    rgb = np.stack([_gray(1), _gray(2), _gray(3)], axis=-1)
    _png(tmp_path / "images" / "rgb.png", rgb)
    _png(tmp_path / "images" / "grayrgb.png", np.repeat(_gray(4)[..., None], 3, axis=-1))
    Image.fromarray(_gray(5)).save(tmp_path / "images" / "photo.jpg", quality=95)
    _png(tmp_path / "images" / "photo.png", _gray(6))  # same id as photo.jpg
    Image.fromarray(_gray(7).astype(np.uint16) * 200).save(tmp_path / "images" / "deep.png")  # 16-bit
    (tmp_path / "images" / "readme.txt").write_text("not an image")
    (tmp_path / "images" / ".DS_Store").write_bytes(b"\0")  # hidden: not looked at
    colour_mask = np.zeros((H, W, 3), np.uint8)
    colour_mask[2:5, 2:5] = (255, 0, 0)
    _png(tmp_path / "masks" / "rgb.png", colour_mask)

    got = collect_folder(tmp_path, _ip(), progress=False)
    images, quarantined = _by_rel(got)
    assert got.n_found == 7
    assert {rel: reason for rel, (reason, _) in quarantined.items()} == {
        "images/photo.png": "duplicate_id", "images/deep.png": "unsupported_format",
        "images/readme.txt": "unsupported_format", "masks/rgb.png": "mask_unreadable",
    }  # fmt: skip
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(images["images/rgb.png"].pixels, luma)
    assert images["images/rgb.png"].notes == ["RGB converted to grayscale (ITU-R 601-2 luma)"]
    np.testing.assert_array_equal(images["images/grayrgb.png"].pixels, _gray(4))
    assert images["images/grayrgb.png"].notes == ["RGB with equal channels read as grayscale"]
    assert images["images/photo.jpg"].pixels.shape == (H, W) and images["images/photo.jpg"].unit == "uint8"

    got = collect_folder(tmp_path, _ip(color="rgb"), progress=False)
    images, _ = _by_rel(got)
    np.testing.assert_array_equal(images["images/rgb.png"].pixels, np.moveaxis(rgb, -1, 0))
    assert all(im.channels == 3 and im.pixels.shape == (3, H, W) for im in got.images)
    assert "grayscale replicated to 3 channels" in images["images/photo.jpg"].notes[0]


# --- volumes: NIfTI (nibabel) and NRRD (pynrrd) ----------------------------------------------------------------------
SHAPE = (5, 6, 4)  # file axes (i, j, k)
SPACING = (0.7, 0.8, 2.5)  # mm along i, j, k
ORIGIN_LPS = (-10.0, 20.0, 30.0)


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 200, size=SHAPE).astype(np.float32)


def _label(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[1:3, 2:4, 1:3] = 1
    return m


def _nifti(path: Path, data: np.ndarray, spacing=SPACING, origin_lps=ORIGIN_LPS, flip_k: bool = False) -> None:
    import nibabel as nib

    affine = np.diag([-spacing[0], -spacing[1], spacing[2] * (-1 if flip_k else 1), 1.0])  # RAS of an LPS-aligned grid
    affine[:3, 3] = (-origin_lps[0], -origin_lps[1], origin_lps[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _nrrd(path: Path, data: np.ndarray, spacing=SPACING, origin_lps=ORIGIN_LPS, flip_k: bool = False) -> None:
    import nrrd

    dirs = np.diag([spacing[0], spacing[1], spacing[2] * (-1 if flip_k else 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"space": "left-posterior-superior", "space directions": dirs, "space origin": np.array(origin_lps)}
    nrrd.write(str(path), data, header)


WRITERS = {"nii.gz": _nifti, "nii": _nifti, "nrrd": _nrrd}


@pytest.mark.parametrize("image_ext", ["nii.gz", "nrrd"])
@pytest.mark.parametrize("mask_ext", ["nii.gz", "nrrd"])
def test_volume_pairs(tmp_path: Path, image_ext: str, mask_ext: str) -> None:
    """A fitting mask is kept (also across formats: both compared in LPS); a mask of another spacing, origin,
    orientation or shape is quarantined mask_geometry, naming what differs, and its image kept."""
    write_image, write_mask = WRITERS[image_ext], WRITERS[mask_ext]
    cases = {
        "fits": ({}, None),
        "spacing": ({"spacing": (0.7, 0.8, 3.0)}, "spacing 3x0.8x0.7 mm vs image 2.5x0.8x0.7 mm"),
        "origin": ({"origin_lps": (-10.0, 20.0, 35.0)}, "origin -10x20x35 mm vs image -10x20x30 mm"),
        "orientation": ({"flip_k": True}, "orientation"),
    }
    for name, (kwargs, _) in cases.items():
        write_image(tmp_path / "images" / f"{name}.{image_ext}", _volume(len(name)))
        write_mask(tmp_path / "masks" / f"{name}.{mask_ext}", _label(), **kwargs)
    write_image(tmp_path / "images" / f"shape.{image_ext}", _volume(0))
    write_mask(tmp_path / "masks" / f"shape.{mask_ext}", _label((5, 6, 3)))

    got = collect_folder(tmp_path, _ip(), progress=False)
    images, quarantined = _by_rel(got)
    assert len(got.images) == 5 and got.n_found == 10
    fits = images[f"images/fits.{image_ext}"]
    assert fits.pixels.dtype == np.float32 and fits.pixels.shape == (4, 6, 5) and fits.unit == "stored"
    np.testing.assert_allclose(fits.pixels, np.transpose(_volume(4), (2, 1, 0)), rtol=1e-6)
    np.testing.assert_array_equal(fits.mask, np.transpose(_label(), (2, 1, 0)))
    assert fits.mask_source == ("NRRD" if mask_ext == "nrrd" else "NIfTI")
    assert fits.spacing == pytest.approx([2.5, 0.8, 0.7])
    geometry = json.loads(json.dumps(fits.geometry))  # JSON-able
    assert geometry["space"] == "LPS" and geometry["shape"] == [4, 6, 5]
    assert geometry["origin"] == pytest.approx(list(ORIGIN_LPS))
    assert geometry["direction"] == pytest.approx([0, 0, 1, 0, 1, 0, 1, 0, 0])  # rows: the S, H, W axes in LPS
    assert len(geometry["affine"]) == 4
    for name, (_, expected) in cases.items():
        if expected is None:
            continue
        reason, detail = quarantined[f"masks/{name}.{mask_ext}"]
        assert reason == "mask_geometry" and expected in detail
        assert images[f"images/{name}.{image_ext}"].mask is None
    reason, detail = quarantined[f"masks/shape.{mask_ext}"]
    assert reason == "mask_geometry" and "size 3x6x5 vs image 4x6x5" in detail


def test_volume_odd_files(tmp_path: Path) -> None:
    """A 2D NIfTI (third axis of length 1) is (H, W); 4D is unsupported; garbage is unreadable / mask_unreadable."""
    _nifti(tmp_path / "images" / "flat.nii", _volume(1)[:, :, :1])
    _nifti(tmp_path / "masks" / "flat.nii", _label()[:, :, :1])
    _nifti(tmp_path / "images" / "fourd.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    _nifti(tmp_path / "images" / "good.nii.gz", _volume(2))
    (tmp_path / "masks" / "good.nii.gz").write_bytes(b"not gzip at all")
    (tmp_path / "images" / "junk.nrrd").write_bytes(b"NRRD0004\ngarbage\n")

    got = collect_folder(tmp_path, _ip(), progress=False)
    images, quarantined = _by_rel(got)
    assert {rel: reason for rel, (reason, _) in quarantined.items()} == {
        "images/fourd.nii.gz": "unsupported_format", "images/junk.nrrd": "unreadable",
        "masks/good.nii.gz": "mask_unreadable",
    }  # fmt: skip
    flat = images["images/flat.nii"]
    assert flat.pixels.shape == (6, 5) and flat.mask.shape == (6, 5) and flat.spacing == pytest.approx([0.8, 0.7])
    assert images["images/good.nii.gz"].mask is None


def test_ingest_run_writes_masks(png_folder: Path, tmp_path: Path) -> None:
    """Through ingest.run: the source's records become manifest rows, masks/*.npy and quarantine.csv rows, and the
    files found add up (ingest's own check)."""
    from tasks.ingest import run

    for i in range(12):  # enough patients for the train/val split of train1
        _png(png_folder / "images" / f"t{i}.png", _gray(20 + i))
        _png(png_folder / "masks" / f"t{i}.png", _blob())
    with (png_folder / "manifest.csv").open("a", newline="") as fh:
        csv.writer(fh).writerows((f"t{i}", ("benign", "malignant")[i % 2], f"q{i}") for i in range(12))
    with (png_folder / "splits" / "train1.txt").open("a") as fh:
        fh.write("".join(f"t{i}\n" for i in range(12)))
    ip = _ip(folder_split=1, input=str(png_folder))
    result = run(ip, tmp_path / "out", class_names=None, progress=False)
    with result.manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and Counter(r["split"] for r in rows)["test"] == 2
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    with_mask = [r for r in rows if r["mask_path"]]
    assert len(with_mask) == 16  # a, c, d, e and t0..t11: b (geometry) and f (none) have none
    assert all(np.load(tmp_path / "out" / r["mask_path"]).shape == (H, W) for r in with_mask)
    reasons = Counter(r["reason"] for r in csv.DictReader((tmp_path / "out" / "quarantine.csv").open()))
    assert reasons == Counter({"mask_orphan": 1, "mask_geometry": 1, "unreadable": 1})
    assert result.summary["files_found"] == result.summary["used"] + result.summary["quarantined"] == 37


def test_busi(tmp_path: Path) -> None:
    """The real BUSI copy (../shared/data/busi): 647 images, all with a mask that fits, val1 ids in the test split."""
    if not (BUSI / "images").is_dir():
        pytest.skip(f"{BUSI} not present (the BUSI copy of ../shared/data; see its SOURCES.md)")
    got = collect_folder(BUSI, _ip(folder_split=1), progress=False)
    assert got.quarantine == [] and got.n_found == 2 * 647 and len(got.images) == 647
    assert all(im.mask is not None and im.mask.shape == im.pixels.shape for im in got.images)
    assert got.class_names == ["benign", "malignant"]
    val1 = set((BUSI / "splits" / "val1.txt").read_text().split())
    test = {got.paths[im.files[0]] for im in got.images if im.split == "test"}
    assert len(val1) == 195 and test == {f"images/{i}.png" for i in val1}
    assert sum(im.mask.any() for im in got.images) == 647
