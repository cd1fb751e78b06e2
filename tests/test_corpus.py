"""Real-world DICOM: every file of the pydicom-data package, of pydicom's own test files and of the files made for
the reader's cases (tests/_dicom_cases.py, corpus ``made``) through ingest's per-file path (read, judge, PS3.15
de-identification, decode, decode sanity, de-identified copy) with the real params' ImageType exclusion and sanity
thresholds, one expected outcome per file.

A file is either decoded (shape from its header, float32, finite, a plausible range for its unit, exactly the notes
listed here, a de-identified copy that says so) or quarantined with the specific reason listed here. Zero crashes:
an exception that is not one of the errors pydicom and its plugins raise for a file's data stops ingest's worker
(UnexpectedReadError, naming the file), and fails the test of that file.
"""

from __future__ import annotations

import fnmatch
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tasks import ingest
from tasks.config import load_params
from tasks.dicom import DicomError, DicomImage, read_dicom
from tasks.dicom.decode import NOTE_JPEG12_GDCM, NOTE_MODALITY_LUT
from tasks.dicom.load import NOTE_GZIP
from tasks.dicom.profile import deidentify
from tasks.dicom.pseudonym import Pseudonymizer
from tasks.dicom.read import NOTE_PHOTOMETRIC
from tasks.dicom.sanity import SanityLimits
from tasks.schema import DeidParams
from tasks.sources.dicom_folder import _read_one
from tests._dicom_cases import MADE, make_all

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _roots() -> dict[str, Path | None]:
    try:
        import data_store
    except ImportError:
        data = None
    else:
        data = Path(data_store.__file__).parent / "data"
    import pydicom.data

    return {"pydicom-data": data, "pydicom": Path(pydicom.data.__file__).parent / "test_files"}


ROOTS = _roots()

# (corpus, glob on the path relative to the corpus root) -> reason; first match wins; anything else must decode
QUARANTINED = [
    ("pydicom-data", "emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
    ("pydicom-data", "liver*.dcm", "not_an_image"),  # Segmentation objects
    ("pydicom", "*.txt", "not_dicom"),
    ("pydicom", "*.json", "not_dicom"),
    ("pydicom", "*.dump", "not_dicom"),
    ("pydicom", "crayons.icc", "not_dicom"),
    ("pydicom", "no_meta.dcm", "not_dicom"),  # no preamble, and nothing of an image or SOP instance
    ("pydicom", "dicomdirtests/TINY_ALPHA/README", "not_dicom"),
    ("pydicom", "dicomdirtests/DICOMDIR*", "no_pixel_data"),  # DICOMDIRs
    ("pydicom", "dicomdirtests/TINY_ALPHA/DICOMDIR", "no_pixel_data"),
    ("pydicom", "dicomdirtests/TINY_ALPHA/PT000000/*", "no_pixel_data"),  # instances stripped of pixel data
    ("pydicom", "ExplVR_*NoMeta.dcm", "no_pixel_data"),  # RT objects without a preamble (read with force)
    ("pydicom", "UN_sequence.dcm", "no_pixel_data"),
    ("pydicom", "empty_charset_LEI.dcm", "no_pixel_data"),
    ("pydicom", "no_meta_group_length.dcm", "no_pixel_data"),
    ("pydicom", "priv_SQ.dcm", "no_pixel_data"),
    ("pydicom", "reportsi*.dcm", "no_pixel_data"),  # SR
    ("pydicom", "test-SR.dcm", "no_pixel_data"),
    ("pydicom", "rtplan.dcm", "no_pixel_data"),
    ("pydicom", "rtstruct.dcm", "no_pixel_data"),
    ("pydicom", "waveform_ecg.dcm", "no_pixel_data"),
    ("pydicom", "rtplan_truncated.dcm", "truncated"),
    ("pydicom", "MR_truncated.dcm", "truncated"),
    ("pydicom", "badVR.dcm", "not_an_image"),  # RT Dose with a wrong VR
    ("pydicom", "rtdose*.dcm", "not_an_image"),
    ("pydicom", "liver*.dcm", "not_an_image"),
    ("pydicom", "JPEG2000-embedded-sequence-delimiter.dcm", "decode_failed"),  # a corrupt codestream
    ("pydicom", "meta_missing_tsyntax.dcm", "decode_failed"),  # Pixel Data (2 bytes) without Rows, Columns, ...
    ("pydicom", "nested_priv_SQ.dcm", "decode_failed"),
    ("pydicom", "dicomdirtests/98892001/CT2N/6293", "excluded_image_type"),  # CT scouts: ImageType LOCALIZER
    ("pydicom", "dicomdirtests/98892001/CT2N/6924", "excluded_image_type"),
    # made for the reader's cases (tests/_dicom_cases.py: how each is made)
    ("made", "cut_in_header.dcm", "truncated"),  # was no_pixel_data: pydicom stops quietly inside a header
    ("made", "deep_nesting.dcm", "malformed"),  # was a RecursionError escaping (a crash)
    ("made", "localizer.dcm", "excluded_image_type"),
    ("made", "all_zero.dcm", "constant_image"),
    ("made", "near_constant.dcm", "constant_image"),
    ("made", "j2k_values_over_bits_stored.dcm", "implausible_values"),
    ("made", "rle_striped_noise.dcm", "corrupt_stream"),  # the noise statistic
    ("made", "jpegls_damaged.dcm", "corrupt_stream"),  # GDCM (CharLS) rejects it, pylibjpeg decodes garbage
    ("made", "jpeg_precision_53.dcm", "corrupt_stream"),  # the header check (GDCM would abort the process)
    ("made", "jpeg_rows_mismatch.dcm", "corrupt_stream"),
    ("made", "rle_panic.dcm", "decode_failed"),  # pylibjpeg-rle panics (a BaseException): was a crash
]

# (corpus, glob) -> the notes a decoded file carries (DicomImage.notes, for the manifest); every other decoded
# file carries none
NOTES = [
    ("pydicom", "zipMR.gz", (NOTE_GZIP,)),  # was not_dicom
    ("pydicom", "JPEG-lossy.dcm", (NOTE_JPEG12_GDCM,)),  # was decode_failed: no pydicom plugin decodes it
    ("made", "ct_small.dcm.gz", (NOTE_GZIP,)),
    ("made", "empty_modality_lut.dcm", (NOTE_MODALITY_LUT,)),  # was decode_failed
    ("made", "acr_nema_no_photometric.dcm", (NOTE_PHOTOMETRIC,)),  # was unsupported_photometric
]

# what ingest runs with: the real params' ImageType exclusion and sanity thresholds
INGEST = load_params(REPO / "params.yaml").ingest
EXCLUDE = tuple(INGEST.exclude_image_types)
SANITY = SanityLimits(INGEST.sanity.max_mode_fraction, INGEST.sanity.max_jump_fraction)


def _files() -> list[tuple[str, str]]:
    out = []
    for corpus, root in ROOTS.items():
        if root is None or not root.is_dir():
            continue
        out += [(corpus, p.relative_to(root).as_posix()) for p in sorted(root.rglob("*"))
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]  # fmt: skip
    return out + [("made", name) for name in MADE]


FILES = _files()


def expected_reason(corpus: str, rel: str) -> str | None:
    for c, pattern, reason in QUARANTINED:
        if c == corpus and fnmatch.fnmatch(rel, pattern):
            return reason
    return None


def expected_notes(corpus: str, rel: str) -> tuple[str, ...]:
    for c, pattern, notes in NOTES:
        if c == corpus and fnmatch.fnmatch(rel, pattern):
            return notes
    return ()


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files made for the reader's cases (tests/_dicom_cases.py), written once per session."""
    return make_all(tmp_path_factory.mktemp("made"))


def test_the_corpora_are_there() -> None:
    if ROOTS["pydicom-data"] is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[dev]'): its 68 real files are not tested")
    counts = {c: sum(1 for f in FILES if f[0] == c) for c in ROOTS}
    assert counts["pydicom-data"] == 68 and counts["pydicom"] > 150, counts


PSEUDO = Pseudonymizer.from_params(DeidParams())
DEID = partial(deidentify, pseudo=PSEUDO, opts=DeidParams())


def _plausible(im: DicomImage) -> None:
    frames = (im.n_frames,) if im.n_frames > 1 else ()
    colour = (3,) if im.channels == 3 else ()
    assert im.pixels.shape == (*frames, im.rows, im.columns, *colour)
    if im.channels == 3:
        assert im.pixels.dtype in (np.uint8, np.uint16, np.uint32)
    else:
        assert im.pixels.dtype == np.float32 and np.isfinite(im.pixels).all()
    lo, hi = float(im.pixels.min()), float(im.pixels.max())
    assert hi > lo, "a constant image: decoded to nothing"
    if im.unit == "HU":
        assert -5000 <= lo and hi <= 40000, (lo, hi)  # padding below air is common: -2000, -3024, -3995 here
    elif im.unit == "RGB":
        assert 0 <= lo and hi <= 2.0**32, (lo, hi)


@pytest.mark.parametrize(("corpus", "rel"), FILES, ids=[f"{c}/{r}" for c, r in FILES])
def test_every_file_is_decoded_or_quarantined_with_its_reason(corpus: str, rel: str, tmp_path: Path,
                                                              made: Path) -> None:  # fmt: skip
    root = made if corpus == "made" else ROOTS[corpus]
    path = root / rel
    expected = expected_reason(corpus, rel)
    got = _read_one(path, root=root, label_key=None, color="rgb", voi=False, deidentify=DEID, write_dir=tmp_path,
                    exclude_image_types=EXCLUDE, sanity=SANITY)  # exactly what ingest's workers run; raises for
    # what is not the file's fault
    if expected is not None:
        assert isinstance(got, DicomError), f"expected quarantine ({expected}), got a decoded image"
        assert got.reason == expected, got.detail
        assert not any(tmp_path.rglob("*.dcm")), "a quarantined file left a de-identified copy"
        return
    assert isinstance(got, DicomImage), f"expected a decoded image, got {got.reason}: {got.detail}"
    assert got.notes == expected_notes(corpus, rel)
    _plausible(got)
    assert got.deid_counts and got.deid_counts.get("U", 0) >= 1  # at least the SOP Instance UID was remapped
    (copy,) = tmp_path.rglob("*.dcm")
    ds = pydicom.dcmread(copy)
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(e.tag.is_private for e in ds)
    if got.channels == 3:  # the same file with a grayscale task: quarantined, not converted
        with pytest.raises(DicomError) as info:
            read_dicom(path, color="reject")
        assert info.value.reason == "color_rejected"


SAMPLE = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "eCT_Supplemental.dcm", "SC_rgb.dcm", "liver.dcm",
          "MR_truncated.dcm", "rtplan.dcm", "no_meta.dcm", "OBXXXX1A.dcm", "ExplVR_BigEndNoMeta.dcm"]  # fmt: skip


def test_ingest_accounts_for_every_file_of_a_mixed_folder(make_params, tmp_path: Path) -> None:
    """ingest.run on a folder of real, mixed files without labels: each file used or quarantined, with reasons."""
    src = tmp_path / "in"
    src.mkdir()
    if ROOTS["pydicom-data"] is None:
        pytest.skip("pydicom-data is not installed (pip install -e '.[dev]')")
    for name in SAMPLE:
        found = [r / name for r in ROOTS.values() if r is not None and (r / name).is_file()]
        shutil.copy(found[0], src / name)
    (src / "notes.txt").write_text("not an image\n")
    (src / "empty.dcm").write_bytes(b"")
    ip = make_params({"ingest.labels_csv": None, "ingest.color": "rgb", "ingest.deid.write_dicom": True,
                      "ingest.workers": 1}).ingest  # fmt: skip
    res = ingest.run(ip, tmp_path / "out", input_path=src, progress=False)
    s = res.summary
    assert s["files_found"] == len(SAMPLE) + 2 and s["used"] + s["quarantined"] == s["files_found"]
    # liver.dcm is a DICOM SEG: read as a mask, of a series not in the folder
    assert s["quarantined_by_reason"] == {"empty_file": 1, "mask_orphan": 1, "no_pixel_data": 2, "not_dicom": 2,
                                          "truncated": 1}  # fmt: skip
    assert s["used"] == 6 and s["series_built"] == 6 and s["all_files_accounted"]
    audit = (tmp_path / "out/deid_audit.json").read_text()
    assert '"files_deidentified": 6' in audit and "burned_in_review" in audit
    assert len(list((tmp_path / "out/dicom").rglob("*.dcm"))) == 6  # the used instances, de-identified


def _corpus_file(name: str) -> Path:
    found = [r / name for r in ROOTS.values() if r is not None and (r / name).is_file()]
    if not found:
        pytest.skip(f"{name} is not in the installed corpora")
    return found[0]


def test_enhanced_multiframe_is_a_volume_from_its_per_frame_geometry() -> None:
    from tasks.dicom.series import stack_series

    im = read_dicom(_corpus_file("eCT_Supplemental.dcm"))  # enhanced CT: per-frame functional groups
    assert im.frame_positions is not None and len(im.frame_positions) == im.n_frames == 2
    out = stack_series([im])
    assert out.pixels.shape == (2, 512, 512) and out.spacing is not None and out.spacing[0] > 0
    assert im.unit == "HU" and -1100 < float(out.pixels.min()) < float(out.pixels.max()) < 3100


@pytest.mark.parametrize(("mode", "rows", "shape"), [("stack", 1, [10, 64, 64]), ("split", 10, [64, 64])])
def test_multiframe_stacked_or_split(mode: str, rows: int, shape: list[int], make_params, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(_corpus_file("emri_small.dcm"), src / "cine.dcm")  # 10 frames, no per-frame positions
    ip = make_params({"ingest.labels_csv": None, "ingest.multiframe": mode, "ingest.workers": 1}).ingest
    res = ingest.run(ip, tmp_path / "out", input_path=src, progress=False)
    import csv
    import json

    with (tmp_path / "out/manifest.csv").open() as fh:
        manifest = list(csv.DictReader(fh))
    assert len(manifest) == rows and res.summary["used"] == 1 and res.summary["quarantined"] == 0
    assert all(json.loads(r["shape"]) == shape for r in manifest)
    assert len({r["image_id"] for r in manifest}) == rows
