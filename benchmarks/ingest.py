"""Ingest benchmark: files/s and MB/s of ``tasks.ingest`` beside a bare pydicom ``dcmread`` + ``pixel_array`` loop.

    python benchmarks/ingest.py --repeats 3 --out ingest-bench.json
    python benchmarks/ingest.py --limit 10 --repeats 1          # a quick check on the first 10 files of each corpus
    python benchmarks/ingest.py --corpora --input /path/to/dicom  # only a folder of your own

Corpora: ``pydicom-data`` (the 68 files of the PyPI package pydicom-data, module ``data_store``), ``default-cohort``
(``ingest.input``, the synthetic cohort of ``python -m tasks.synth``; generated into a temporary folder when
absent, with ``--limit`` only enough patients for N files; its label table ``ingest.labels_csv``, which lives in the
folder, is not part of the corpus: the corpus is then a tree of links to the other files) and every ``--input DIR``.
Ingest reads each corpus in place, unlabelled (``ingest.labels_csv: null``), with ``--workers`` processes (default:
all cores), and writes into a
temporary folder; its time includes reading, validation, de-identification, series stacking, the patient split and
writing the arrays (unlabelled, a corpus too small for a patient split is written without one). Colour is converted
(``ingest.color: rgb``), so that ingest decodes what the bare loop decodes. An ingest that raises is reported as
"failed" and the bare loops are still timed. The bare loop
reads the same files (every regular file; a failure counts as processed) in one process and in ``--workers``
processes; its workers return nothing to the parent (ingest's return the pixels). Each is timed ``--repeats`` times,
interleaved (the order rotated each repeat), after warming this process's imports; the best time is
reported, the median beside it.
ingest/this = ingest files/s / that bare loop's files/s (same files, so also the MB/s ratio); the target is >= 0.8.

What the decode sanity layer (``ingest.sanity``, tasks/dicom/sanity.py) costs, two ways (the target: <= 10% of
ingest's time): ``--sanity-cost`` also times ingest with ``ingest.sanity.enabled: false`` in the same interleaved
repeats (end to end, as noisy as the two timings), and times the checks alone in this process: ``check_stored`` on
the stored values of every file that decodes (decoding not counted), summed over the corpus, best of the repeats,
beside ingest's best time x workers (the CPU seconds ingest had at most, so the share shown is a lower bound of
its share; with ``--workers 1`` it is the share).

    python benchmarks/ingest.py --repeats 3 --sanity-cost --out ingest-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.medmnist import parse_sets  # noqa: E402
from tasks.config import Params, load_params  # noqa: E402

BUILTIN = ("pydicom-data", "default-cohort")


def bare_read(path: Path) -> int:
    """``dcmread`` + ``pixel_array`` of one file; the array's bytes, 0 when the file fails (it still counts)."""
    import pydicom

    try:
        return int(pydicom.dcmread(path).pixel_array.nbytes)
    except Exception:  # a benchmark of the happy path's cost: any failure is just a processed file
        return 0


def bare_loop(files: list[Path], workers: int) -> None:
    """Read every file with ``workers`` processes (1: in this process), chunked as ingest's pool is."""
    if workers <= 1:
        for f in files:
            bare_read(f)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(bare_read, files, chunksize=max(1, min(32, len(files) // (8 * workers)))))


def warm_imports() -> None:
    """Import in this process what the timed calls import lazily (pydicom, its pixel handlers' numpy, the split's
    scikit-learn), so that the first repeat is not charged for it (forked pool workers inherit them too)."""
    import pydicom  # noqa: F401
    import sklearn.model_selection  # noqa: F401

    import tasks.dicom.read  # noqa: F401
    import tasks.ingest  # noqa: F401


def corpus_files(folder: Path, exclude: frozenset[Path] = frozenset()) -> list[Path]:
    """Every regular file under ``folder`` (sorted), except those in ``exclude``."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p not in exclude)


def default_cohort(params: Params, tmp: Path, limit: int | None) -> tuple[Path, frozenset[Path]]:
    """``ingest.input`` if it holds files, else a freshly generated cohort (with ``--limit``: only enough
    patients for ``limit`` files, each patient having at least one); with its label table, which is no DICOM file
    and not part of the corpus."""
    folder = Path(params.ingest.input)
    folder = folder if folder.is_absolute() else REPO / folder
    if not (folder.is_dir() and corpus_files(folder)):
        from tasks import synth

        sp = params.synth if limit is None else params.synth.model_copy(update={"n_patients": max(4, limit)})
        print(f"{folder} is absent: generating {sp.n_patients} synthetic patients into {tmp / 'synthetic'}",
              flush=True)
        folder = synth.run(sp, tmp / "synthetic", progress=True).dicom_dir
    labels = params.ingest.labels_csv
    return folder, frozenset({folder / labels} if labels else ())


def limited(folder: Path, limit: int | None, tmp: Path, exclude: frozenset[Path] = frozenset()) -> Path:
    """``folder`` itself, or a tree of symlinks to its first ``limit`` files (sorted; ingest follows links) and,
    when ``exclude`` names files there, to all the others."""
    files = corpus_files(folder, exclude)
    if limit is None and len(files) == len(corpus_files(folder)):
        return folder
    for f in files[:limit]:
        link = tmp / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)
    return tmp


def stored_of(files: list[Path]) -> list[tuple[Any, dict[str, Any]]]:
    """The decoded stored values of every file that decodes, with the keyword arguments ingest's read passes to
    ``check_stored`` for it (what the sanity checks see; files that fail before or while decoding are left out)."""
    from tasks.dicom import DicomError, quiet_pydicom
    from tasks.dicom.decode import GRAYSCALE, stored_values
    from tasks.dicom.errors import decode_errors
    from tasks.dicom.load import load_dataset
    from tasks.dicom.read import check_usable

    out = []
    for f in files:
        try:
            with quiet_pydicom():
                ds = load_dataset(f)
                photometric = check_usable(ds, "rgb")
                stored = stored_values(ds, photometric, [])
                syntax = ds.file_meta.get("TransferSyntaxUID")
                out.append((stored, {"bits_stored": int(ds.get("BitsStored") or ds.BitsAllocated),
                                     "signed": int(ds.get("PixelRepresentation") or 0) == 1,
                                     "grayscale": photometric in GRAYSCALE,
                                     "compressed": bool(syntax is not None and syntax.is_encapsulated)}))  # fmt: skip
        except (DicomError, *decode_errors()):  # not decodable: ingest quarantines it before the checks
            continue
    return out


def time_sanity(decoded: list[tuple[Any, dict[str, Any]]], limits: Any) -> float:
    """Seconds ``check_stored`` takes over ``decoded`` (what it refuses counts too: the check ran)."""
    from tasks.dicom import DicomError
    from tasks.dicom.sanity import check_stored

    t = time.perf_counter()
    for stored, kwargs in decoded:
        try:
            check_stored(stored, limits=limits, **kwargs)
        except DicomError:
            pass
    return time.perf_counter() - t


def bench_corpus(name: str, folder: Path, params: Params, repeats: int, work: Path,
                 sanity_cost: bool = False) -> dict[str, Any]:  # fmt: skip
    """Time ingest and the two bare loops ``repeats`` times each, interleaved, on every file under ``folder``;
    with ``sanity_cost`` also ingest without the sanity checks, and the checks alone (see the module docstring)."""
    from tqdm import tqdm

    from tasks import ingest
    from tasks.dicom.sanity import SanityLimits

    files = corpus_files(folder)
    mb = sum(f.stat().st_size for f in files) / 1e6
    workers = params.ingest.workers

    ip = params.ingest.model_copy(update={"labels_csv": None})  # unlabelled, whatever folder this is
    ip_off = ip.model_copy(update={"sanity": ip.sanity.model_copy(update={"enabled": False})})

    def run_ingest(p: Any = ip) -> Any:
        return ingest.run(p, work / "out", class_names=params.base.class_names,
                          split_seed=params.base.split_seed, input_path=folder, labels_csv=None, progress=False)

    methods: dict[str, Callable[[], Any]] = {
        "ingest": run_ingest,
        **({"ingest, no sanity": lambda: run_ingest(ip_off)} if sanity_cost else {}),
        "bare 1 proc": lambda: bare_loop(files, 1),
        f"bare {workers} procs": lambda: bare_loop(files, workers),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    summary: dict[str, Any] | None = None
    error = None
    order = list(methods)
    for r in tqdm(range(repeats), desc=f"{name}: repeats", unit="rep"):
        for method in order[r % len(order):] + order[: r % len(order)]:  # rotated: no method always goes first
            call = methods[method]
            if method.startswith("ingest") and error:
                continue
            t = time.perf_counter()
            try:
                res = call()
            except ValueError as exc:  # too few patients to split (tasks.sources.split), or a bad setting: report it
                error = f"{type(exc).__name__}: {exc}"
                continue
            times[method].append(time.perf_counter() - t)
            if method == "ingest":
                summary = res.summary
    rows = {}
    for method, ts in times.items():
        best = min(ts) if ts else None
        rows[method] = {"best_s": best, "median_s": statistics.median(ts) if ts else None, "times_s": ts,
                        "files_per_s": best and len(files) / best, "mb_per_s": best and mb / best}
    ingest_s = rows["ingest"]["best_s"]
    ratios = {m: ingest_s and rows[m]["best_s"] and rows[m]["best_s"] / ingest_s for m in methods if m != "ingest"}
    sanity = None
    if sanity_cost:
        decoded = stored_of(files)
        limits = SanityLimits(ip.sanity.max_mode_fraction, ip.sanity.max_jump_fraction)
        alone = min(time_sanity(decoded, limits) for _ in range(max(1, repeats)))
        off = rows["ingest, no sanity"]["best_s"]
        sanity = {"checks_alone_s": alone, "files_checked": len(decoded),
                  "share_of_ingest_cpu_lower_bound": ingest_s and alone / (ingest_s * workers),
                  "end_to_end_share": ingest_s and off and (ingest_s - off) / ingest_s}  # fmt: skip
    return {"corpus": name, "path": str(folder), "files": len(files), "mb": mb, "workers": workers,
            "methods": rows, "ratio_ingest_over_bare": ratios, "ingest_error": error, "summary": summary,
            "sanity": sanity}


def format_table(results: list[dict[str, Any]]) -> str:
    """The printed comparison: one row per corpus and method, then ingest's counts per corpus."""
    lines = [f"{'corpus':<16}{'files':>6}{'MB':>8}  {'method':<15}{'best s':>8}{'median s':>10}{'files/s':>9}"
             f"{'MB/s':>8}{'ingest/this':>13}"]
    for r in results:
        for method, m in r["methods"].items():
            ratio = r["ratio_ingest_over_bare"].get(method)
            if m["best_s"] is None:
                cells = f"{'failed':>8}{'':>10}{'':>9}{'':>8}"
            else:
                cells = f"{m['best_s']:>8.2f}{m['median_s']:>10.2f}{m['files_per_s']:>9.1f}{m['mb_per_s']:>8.2f}"
            lines.append(f"{r['corpus'][:15]:<16}{r['files']:>6}{r['mb']:>8.1f}  {method:<15}{cells}"
                         f"{'' if ratio is None else f'{ratio:.2f}':>13}")
    for r in results:
        c = r.get("sanity")
        if c:
            e2e = c["end_to_end_share"]
            lines.append(f"{r['corpus']}: sanity checks alone {c['checks_alone_s'] * 1000:.1f} ms for "
                         f"{c['files_checked']} decoded files = {c['share_of_ingest_cpu_lower_bound']:.1%} of "
                         f"ingest's {r['workers']} workers x best time (a lower bound of their share); ingest "
                         f"with / without them: {'n/a' if e2e is None else f'{e2e:+.1%}'} (end to end); target "
                         "<= 10%")  # fmt: skip
    for r in results:
        s = r["summary"]
        if r["ingest_error"]:
            lines.append(f"{r['corpus']}: ingest failed: {r['ingest_error']}")
        elif s:
            lines.append(f"{r['corpus']}: files_found {s['files_found']}, used {s['used']}, quarantined "
                         f"{s['quarantined']} {s['quarantined_by_reason']}; {s['series_built']} images from "
                         f"{s['patients']} patients")
    lines.append("ingest/this = ingest files/s / that method's files/s (same files, so also the MB/s ratio); "
                 "target >= 0.8")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", nargs="*", choices=BUILTIN, default=list(BUILTIN), help="built-in corpora to run")
    ap.add_argument("--input", type=Path, action="append", default=[], help="also a DICOM folder of your own")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="ingest.workers and the bare pool")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N files (sorted) of each corpus")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params override")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument("--sanity-cost", action="store_true",
                    help="also time ingest with ingest.sanity.enabled false, and the sanity checks alone")
    args = ap.parse_args(argv)
    # colour converted, not rejected: ingest then decodes every file the bare loop decodes (like for like)
    overrides = {"ingest.color": "rgb", **parse_sets(args.set), "ingest.workers": args.workers}
    params = load_params(args.params, overrides)  # ingest.labels_csv as set: the default cohort's table is excluded
    warm_imports()
    results = []
    with tempfile.TemporaryDirectory(prefix="medpipe-ingest-bench-") as tmp_name:
        tmp = Path(tmp_name)
        corpora: list[tuple[str, Path, frozenset[Path]]] = []
        if "pydicom-data" in args.corpora:
            import data_store

            corpora.append(("pydicom-data", Path(data_store.__file__).parent / "data", frozenset()))
        if "default-cohort" in args.corpora:
            corpora.append(("default-cohort", *default_cohort(params, tmp, args.limit)))
        corpora += [(str(p), p, frozenset()) for p in args.input]
        for i, (name, folder, exclude) in enumerate(corpora):
            work = tmp / f"corpus{i}"
            corpus = limited(folder, args.limit, work / "in", exclude)
            results.append(bench_corpus(name, corpus, params, args.repeats, work, args.sanity_cost))
            results[-1]["path"] = str(folder)
            results[-1]["excluded"] = sorted(str(p.relative_to(folder)) for p in exclude)
    print()
    print(format_table(results))
    if args.out:
        figures = {"workers": args.workers, "repeats": args.repeats, "limit": args.limit, "cpu_count": os.cpu_count(),
                   "overrides": overrides, "corpora": results}
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"figures -> {args.out}")


if __name__ == "__main__":
    main()
