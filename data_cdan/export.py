"""Sharing prepared CDAN datasets: Parquet shards in the Hub layout, and `push_to_hub` (never MIMIC-CXR)."""

import math
import os
from pathlib import Path

import datasets
from datasets.features import Image, List
from datasets.table import embed_table_storage

from .mimic_cxr import MimicCxrBuilder


def _estimated_row_bytes(dataset: datasets.Dataset, embed_images: bool, sample_size: int = 64) -> float:
    if len(dataset) == 0:
        return 1.0
    sample = dataset.select(range(min(sample_size, len(dataset)))).with_format("arrow")[:]
    total = float(sample.nbytes)
    if embed_images:
        for column, feature in dataset.features.items():
            if isinstance(feature, List) and isinstance(feature.feature, Image):
                for images in sample.column(column).to_pylist():
                    for image in images or []:
                        if image and image.get("bytes"):
                            total += len(image["bytes"])
                        elif image and image.get("path") and os.path.isfile(image["path"]):
                            total += os.path.getsize(image["path"])
    return max(total / sample.num_rows, 1.0)


def export_to_parquet(
    dataset_dict: datasets.DatasetDict,
    output_dir: str | os.PathLike,
    embed_images: bool = True,
    max_shard_size: int = 500 * 1024 * 1024,
) -> dict[str, list[Path]]:
    """
    Write each split as Parquet shards `<output_dir>/data/<split>-NNNNN-of-NNNNN.parquet` (the Hub layout).

    Args:
        dataset_dict (`datasets.DatasetDict`): e.g. from [`load_cdan_dataset`].
        output_dir (`str` or `os.PathLike`): destination folder.
        embed_images (`bool`, *optional*, defaults to `True`): store the image bytes in the files (self-contained,
            as `push_to_hub` does) instead of local paths.
        max_shard_size (`int`, *optional*): approximate bytes per shard.

    Returns:
        `dict[str, list[Path]]`: the shard files per split.
    """
    data_dir = Path(output_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for split, dataset in dataset_dict.items():
        row_bytes = _estimated_row_bytes(dataset, embed_images)
        num_shards = max(1, math.ceil(len(dataset) * row_bytes / max_shard_size))
        num_shards = min(num_shards, max(1, len(dataset)))
        written[split] = []
        for index in range(num_shards):
            shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
            if embed_images:
                shard_format = shard.format
                shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
                shard = shard.with_format(**shard_format)
            path = data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
            shard.to_parquet(str(path))
            written[split].append(path)
    return written


def _is_mimic(dataset_dict: datasets.DatasetDict) -> bool:
    for dataset in dataset_dict.values():
        if dataset.info.dataset_name == MimicCxrBuilder.DATASET_NAME or "prior_study_id" in dataset.column_names:
            return True
    return False


def push_to_hub(
    dataset_dict: datasets.DatasetDict,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    max_shard_size: int | str = "500MB",
    **kwargs,
):
    """
    Push a prepared CDAN dataset to the Hugging Face Hub as Parquet with the images embedded (never as a script).

    Refuses MIMIC-CXR: the PhysioNet licence forbids redistributing it. IU X-Ray is CC BY-NC-ND 4.0 (keep the
    licence on the dataset card).

    Args:
        dataset_dict (`datasets.DatasetDict`): the prepared splits.
        repo_id (`str`): `<namespace>/<name>` of the dataset repository.
        private (`bool`, *optional*, defaults to `True`): create the repository private.
        token (`str`, *optional*): Hub token.
        max_shard_size (`int` or `str`, *optional*): Parquet shard size.
        **kwargs: more arguments of `datasets.DatasetDict.push_to_hub`.

    Returns:
        What `datasets.DatasetDict.push_to_hub` returns (the commit info).
    """
    if _is_mimic(dataset_dict):
        raise ValueError(
            "MIMIC-CXR may not be redistributed (PhysioNet Credentialed Health Data License); nothing was pushed."
        )
    return dataset_dict.push_to_hub(
        repo_id, private=private, token=token, max_shard_size=max_shard_size, embed_external_files=True, **kwargs
    )


__all__ = ["export_to_parquet", "push_to_hub"]
