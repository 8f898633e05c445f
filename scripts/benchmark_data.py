"""Benchmark the CDAN data builders (`data_cdan`) on CPU and print a table.

Rows:

1. IU X-Ray, R2Gen layout: preparing all 2,955 R2Gen studies (the real `annotation.json` in ../shared) with image
   paths only (`verify_images=False`). Placeholder images are hard links to one tiny PNG in a temporary folder.
   Target: under 30 s on 2 cores. For reference the same with `verify_images=True`, the Open-I layout (the real
   `NLMCXR_reports.tgz` + R2Gen annotation + DICOM metadata, 7,470 placeholder PNGs), and the cost of verifying one
   real 640 px PNG.
2. MIMIC-CXR: peak resident memory (`VmHWM`) of preparing a generated fixture of N annotation / metadata rows
   (default 10k and 100k), each in a fresh subprocess; "growth" is the peak minus the resident memory right after the
   imports. Memory must not grow with the number of studies beyond the compact column tables.
3. Image decoding + transformation throughput (images/s): a prepared IU X-Ray dataset whose images are the real chest
   X-ray PNGs of ../shared/data/cxr_images (640 px, 8-bit), read through a `torch.utils.data.DataLoader` with 2
   workers; each study is decoded by `datasets.Image()` and transformed per view by `CdanImageProcessor`'s
   `eval_transform()` / `train_transform()` (224 px, 2 views).
4. Demo: preparing the embedded demo (`data/demo/reports.jsonl`, rendering + labelling), 1 and 2 processes.
   Target: under 1 minute on 2 cores.

The 2-core machines are shared: each row also reports the share of the machine's CPU time used by OTHER processes
while it ran (from /proc/stat minus this process tree), so contended rows can be told apart.

Run:

    python scripts/benchmark_data.py
    python scripts/benchmark_data.py --mimic_rows 10000 100000 --loader_studies 256 --skip_demo
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmark_utils import CpuMeter, markdown_table, peak_rss_mb
from PIL import Image


def tiny_png(path: Path) -> Path:
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), "L").save(path)
    return path


def hard_link_all(destinations, source: Path) -> int:
    count = 0
    for destination in destinations:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, destination)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------------
def benchmark_iu_xray(work: Path) -> list[dict]:
    import datasets
    from data_cdan import check_image_file, get_cdan_builder
    from data_cdan.testing import (
        ANNOTATION_FILE,
        DICOM_METADATA_FILE,
        REPORTS_ARCHIVE,
        load_annotation,
        openi_reports,
        real_pngs,
    )

    datasets.disable_progress_bars()
    placeholder = tiny_png(work / "placeholder.png")
    annotation = load_annotation()
    r2gen = work / "iu_r2gen"
    r2gen.mkdir()
    (r2gen / "annotation.json").symlink_to(ANNOTATION_FILE)
    linked = hard_link_all(
        (
            r2gen / "images" / path
            for entries in annotation.values()
            for entry in entries
            for path in entry["image_path"]
        ),
        placeholder,
    )
    png_dir = work / "NLMCXR_png"
    hard_link_all(
        (png_dir / f"{image['id']}.png" for report in openi_reports() for image in report["images"]), placeholder
    )
    rows = []
    settings = [
        ("IU X-Ray R2Gen layout, paths only", {"data_dir": r2gen, "verify_images": False}),
        ("IU X-Ray R2Gen layout, verify_images", {"data_dir": r2gen, "verify_images": True}),
        (
            "IU X-Ray Open-I layout (tgz + R2Gen split), paths only",
            {
                "reports_file": REPORTS_ARCHIVE,
                "images_dir": png_dir,
                "annotation_file": ANNOTATION_FILE,
                "dicom_metadata_file": DICOM_METADATA_FILE,
                "verify_images": False,
            },
        ),
    ]
    for index, (name, options) in enumerate(settings):
        with CpuMeter() as timer:
            builder = get_cdan_builder("iu_xray", cache_dir=work / f"cache_iu_{index}", **options)
            builder.download_and_prepare()
            dataset = builder.as_dataset()
        studies = sum(len(split) for split in dataset.values())
        rows.append(
            {
                "benchmark": name,
                "result": f"{timer.seconds:.1f} s for {studies} studies ({studies / timer.seconds:.0f} studies/s)",
                "target": "< 30 s" if index == 0 else "",
                "foreign CPU": timer.foreign_load,
            }
        )
    rows[0]["result"] += f"; {linked} placeholder images"
    real = [path for path in real_pngs() if "covid19_mhh_hannover" in str(path)]
    with CpuMeter() as timer:
        unreadable = [path for path in real if check_image_file(path) is not None]
    per_image = timer.seconds / len(real)
    rows.append(
        {
            "benchmark": "verify_images cost: check_image_file on real 640 px PNGs",
            "result": f"{per_image * 1000:.2f} ms/image ({len(real)} PNGs, {len(unreadable)} unreadable): about "
            f"{per_image * 7470:.0f} s for Open-I's 7,470 images",
            "target": "",
            "foreign CPU": timer.foreign_load,
        }
    )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
def mimic_child(data_dir: str, cache_dir: str) -> None:
    """Subprocess body: prepare MIMIC-CXR, print JSON with resident memory before and peak."""
    import datasets
    import psutil

    from data_cdan import get_cdan_builder

    datasets.disable_progress_bars()
    baseline = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    builder = get_cdan_builder("mimic_cxr", data_dir=data_dir, cache_dir=cache_dir)
    builder.download_and_prepare()
    seconds = time.perf_counter() - start
    rows = sum(split.num_examples for split in builder.info.splits.values())
    peak = peak_rss_mb()
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds, "rows": rows}))


def benchmark_mimic(work: Path, row_counts: list[int]) -> list[dict]:
    from data_cdan.testing import generate_mimic_studies, write_mimic_fixture

    placeholder = work / "placeholder.jpg"
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), "L").save(placeholder)
    rows = []
    for count in row_counts:
        root = write_mimic_fixture(work / f"mimic_{count}", generate_mimic_studies(count, seed=0), placeholder)
        with CpuMeter() as timer:
            completed = subprocess.run(
                [sys.executable, __file__, "--mimic_child", str(root), str(work / f"cache_mimic_{count}")],
                capture_output=True,
                text=True,
                check=True,
            )
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "benchmark": f"MIMIC-CXR prepare, {count:,} fixture rows (subprocess)",
                "result": f"peak RSS {result['peak_mb']:.0f} MB (after imports {result['baseline_mb']:.0f} MB, growth "
                f"{result['peak_mb'] - result['baseline_mb']:.0f} MB); {result['rows']:,} examples in "
                f"{result['seconds']:.1f} s",
                "target": "flat in N",
                "foreign CPU": timer.foreign_load,
                "peak_mb": result["peak_mb"],
                "growth_mb": result["peak_mb"] - result["baseline_mb"],
            }
        )
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        extra_rows = row_counts[-1] - row_counts[0]
        per_row = (last["growth_mb"] - first["growth_mb"]) * 2**20 / extra_rows
        rows.append(
            {
                "benchmark": f"MIMIC-CXR growth {row_counts[0]:,} -> {row_counts[-1]:,} rows",
                "result": f"{last['peak_mb'] - first['peak_mb']:+.0f} MB peak RSS for {extra_rows:,} more rows "
                f"({per_row:.0f} bytes/row)",
                "target": "",
                "foreign CPU": float("nan"),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
class StudyViews:
    """Map-style torch dataset: the views of one study, decoded by `datasets` and transformed per view."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        import torch

        from image_processing_cdan import load_image

        return torch.stack([self.transform(load_image(image)) for image in self.dataset[index]["images"]])


def benchmark_loader(work: Path, studies: int, workers: int, batch_size: int) -> list[dict]:
    import datasets
    import torch
    from data_cdan import load_cdan_dataset
    from data_cdan.testing import load_annotation, real_pngs
    from image_processing_cdan import CdanImageProcessor

    datasets.disable_progress_bars()
    annotation = load_annotation()
    subset = {"train": annotation["train"][:studies], "val": [], "test": []}
    root = work / "iu_loader"
    root.mkdir()
    (root / "annotation.json").write_text(json.dumps(subset), encoding="utf-8")
    sources = [path for path in real_pngs() if "covid19_mhh_hannover" in str(path)]
    for index, entry in enumerate(subset["train"]):
        for view, path in enumerate(entry["image_path"]):
            destination = root / "images" / path
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.symlink_to(sources[(2 * index + view) % len(sources)])
    dataset = load_cdan_dataset("iu_xray", data_dir=root, cache_dir=work / "cache_loader")["train"]
    processor = CdanImageProcessor(image_size=224, num_views=2)
    rows = []
    for name, transform in (
        ("eval_transform", processor.eval_transform()),
        ("train_transform", processor.train_transform()),
    ):
        loader = torch.utils.data.DataLoader(
            StudyViews(dataset, transform), batch_size=batch_size, num_workers=workers, persistent_workers=False
        )
        shape = None
        with CpuMeter() as timer:
            for batch in loader:
                shape = tuple(batch.shape)
        images = 2 * len(dataset)
        views = StudyViews(dataset, transform)
        sample = range(min(32, len(dataset)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        cpu_start = time.process_time()
        for index in sample:
            views[index]
        cpu_ms = (time.process_time() - cpu_start) / (2 * len(sample)) * 1000
        torch.set_num_threads(threads)
        rows.append(
            {
                "benchmark": f"DataLoader ({workers} workers, batch {batch_size}): datasets.Image decode + {name}",
                "result": f"{images / timer.seconds:.0f} images/s ({images} real 640 px PNGs, {timer.seconds:.1f} s, "
                f"batches {shape}); {cpu_ms:.1f} CPU ms/image in one 1-thread process",
                "target": "",
                "foreign CPU": timer.foreign_load,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
def benchmark_demo(work: Path) -> list[dict]:
    import datasets

    from data_cdan import get_cdan_builder

    datasets.disable_progress_bars()
    rows = []
    for num_proc in (1, 2):
        with CpuMeter() as timer:
            builder = get_cdan_builder("demo", cache_dir=work / f"cache_demo_{num_proc}")
            builder.download_and_prepare(num_proc=num_proc)
        studies = sum(split.num_examples for split in builder.info.splits.values())
        rows.append(
            {
                "benchmark": f"Demo prepare (render + label + PNG), num_proc={num_proc}",
                "result": f"{timer.seconds:.1f} s for {studies} studies",
                "target": "< 60 s",
                "foreign CPU": timer.foreign_load,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    table_rows = [
        (
            row["benchmark"],
            row["result"],
            row["target"],
            "" if math.isnan(row["foreign CPU"]) else f"{row['foreign CPU']:.0%}",
        )
        for row in rows
    ]
    print(markdown_table(("benchmark", "result", "target", "other processes' CPU share"), table_rows, align="llll"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mimic_rows", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--loader_studies", type=int, default=256, help="studies (2 views each) read by the loader")
    parser.add_argument("--loader_workers", type=int, default=2)
    parser.add_argument("--loader_batch_size", type=int, default=16)
    parser.add_argument("--skip_iu", action="store_true")
    parser.add_argument("--skip_mimic", action="store_true")
    parser.add_argument("--skip_loader", action="store_true")
    parser.add_argument("--skip_demo", action="store_true")
    parser.add_argument("--output_json", default=None, help="also write the rows here")
    parser.add_argument("--mimic_child", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mimic_child:
        mimic_child(*args.mimic_child)
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cdan_data_benchmark_") as directory:
        work = Path(directory)
        if not args.skip_iu:
            rows += benchmark_iu_xray(work)
        if not args.skip_mimic:
            rows += benchmark_mimic(work, args.mimic_rows)
        if not args.skip_loader:
            rows += benchmark_loader(work, args.loader_studies, args.loader_workers, args.loader_batch_size)
        if not args.skip_demo:
            rows += benchmark_demo(work)
    print(f"CPUs: {os.cpu_count()}, load average at the end: {os.getloadavg()}")
    print_table(rows)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()


__all__ = ["benchmark_demo", "benchmark_iu_xray", "benchmark_loader", "benchmark_mimic", "main"]
