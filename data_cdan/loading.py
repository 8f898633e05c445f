"""Entry points: the builder for a dataset name, and preparing + loading it in one call."""

import dataclasses
import difflib
import os

import datasets

from .base import CdanBuilder
from .demo import DemoBuilder
from .iu_xray import IuXrayBuilder
from .mimic_cxr import MimicCxrBuilder


BUILDERS: dict[str, type[CdanBuilder]] = {"iu_xray": IuXrayBuilder, "mimic_cxr": MimicCxrBuilder, "demo": DemoBuilder}


def get_cdan_builder(
    name: str, data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, **options
) -> CdanBuilder:
    """
    The builder for `name` (`"iu_xray"`, `"mimic_cxr"` or `"demo"`), not yet prepared.

    Args:
        name (`str`): the dataset.
        data_dir (`str` or `os.PathLike`, *optional*): folder with the input files.
        cache_dir (`str` or `os.PathLike`, *optional*): root of the prepared data.
        **options: fields of the builder's config (policies `on_<problem>`, `verify_images`, file options, ...).
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown CDAN dataset {name!r}; choose one of {sorted(BUILDERS)}.")
    config_fields = {field.name for field in dataclasses.fields(BUILDERS[name].BUILDER_CONFIG_CLASS)}
    for option in options:
        if option not in config_fields:
            close = difflib.get_close_matches(option, sorted(config_fields), n=3)
            hint = f" Did you mean {' or '.join(repr(match) for match in close)}?" if close else ""
            raise TypeError(
                f"{name} has no option {option!r}.{hint} Its options are the fields of "
                f"{BUILDERS[name].BUILDER_CONFIG_CLASS.__name__}."
            )
    if cache_dir is not None and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise NotADirectoryError(f"cache_dir {os.fspath(cache_dir)} is a file; give a folder for the prepared data.")
    options = {key: str(value) if isinstance(value, os.PathLike) else value for key, value in options.items()}
    if isinstance(options.get("view_names"), list):
        options["view_names"] = tuple(options["view_names"])
    return BUILDERS[name](
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        data_dir=str(data_dir) if data_dir is not None else None,
        **options,
    )


def load_cdan_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download_mode: str | None = None,
    **options,
) -> datasets.DatasetDict:
    """
    Prepare (once, then from cache) and load a CDAN dataset.

    Args:
        name (`str`): `"iu_xray"`, `"mimic_cxr"` or `"demo"`.
        data_dir (`str` or `os.PathLike`, *optional*): folder with the input files (not needed for the demo).
        cache_dir (`str` or `os.PathLike`, *optional*): root of the prepared data (`HF_DATASETS_CACHE` by default).
        download_mode (`str`, *optional*): `"force_redownload"` rebuilds after the inputs changed.
        **options: config fields, e.g. `on_missing_image="skip"`, `verify_images=False`, `max_studies_per_split=8`.

    Returns:
        `datasets.DatasetDict`: `train`, `validation`, `test`.

    Example:

    ```python
    >>> dataset = load_cdan_dataset("iu_xray", data_dir="data/iu_xray")
    >>> dataset["train"][0]["images"]  # decoded lazily into PIL images
    ```
    """
    builder = get_cdan_builder(name, data_dir=data_dir, cache_dir=cache_dir, **options)
    builder.download_and_prepare(download_mode=download_mode)
    return builder.as_dataset()


__all__ = ["BUILDERS", "get_cdan_builder", "load_cdan_dataset"]
