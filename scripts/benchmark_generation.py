"""Benchmark CPU report generation of CDAN against a stock ResNet-101 + BERT stack of the same size, and of the
library's other model types (D2R-Net with 10 boxes per view, PriorRG at 518 px) at their published sizes.

Both stacks are randomly initialised (weights do not change the speed) and write exactly 60-token reports (the start
token plus 59 generated tokens) from two 224 px views per study, with the stock `GenerationMixin.generate()`:

* CDAN: `CdanForConditionalGeneration(CdanConfig())` (timm ResNet-101, reverse attention, 3 + 3 layers of width 512).
* Stock: `transformers.ResNetModel` (ResNet-101) on both views, a Linear 2048 -> 512, and a 3-layer
  `BertLMHeadModel` decoder (width 512, 8 heads, FFN 2048, vocabulary 764) cross-attending to the 98 patch tokens.
* D2R-Net (`--stacks d2r`): `D2RNetForConditionalGeneration(D2RNetConfig())` (ResNet-101 with CPCA, RoIAlign lesion
  branch, R2Gen's memory-driven decoder) with `D2R_BOXES_PER_VIEW` random boxes per view.
* PriorRG (`--stacks priorrg`): `PriorRGForConditionalGeneration(PriorRGConfig())` on 518 px views (no context, no
  prior: the image path alone).

Each (stack, batch, beams, cache) setting runs in a fresh subprocess (the script re-invokes itself with
`--single_setting`), so its peak resident memory (model construction included) is its own; the two stacks
of one (batch, beams, cache) setting run back to back, so slow drifts of the machine hit both alike. A setting is
warmed up with one full `generate()` call, then timed over `--repeats` calls; forward hooks on the visual extractor
time it inside those calls, and throughput and extractor share come from the fastest timed call.

The 2-core machines are shared: another process busy on the CPUs slows a 2-thread OpenMP run down by up to 10x. Before
each timed call the script waits (at most `--max_idle_wait` s) for the CPUs to be idle, measures from `/proc/stat` how
much CPU other processes took during the call, and replaces a call during which they took `--max_foreign_load` (10 %)
of the machine or more, with at most `--max_extra_runs` extra calls. A row whose every call was contended is marked
`*`.

`--variants` adds CDAN rows prepared for faster inference (`inference_cdan.optimize_for_inference`), each in its own
subprocess and timed the same way, beside the float32 row of the same setting, with their speed-up over it: `fp32` (the
default, the only row without the option), `int8` (dynamic int8 linear layers of the default scope, the encoder layers
and the decoder's cross-attention), `int8-all` (every linear layer outside the visual extractor, its projection and the
head), `bf16` (bfloat16 autocast; a CPU without AVX512-BF16 or AMX skips the row with the reason), `compile` (the
visual extractor compiled; the warm-up call compiles), `int8+compile`, `bf16+compile`, `onnxruntime` (the model
exported with `onnx_cdan.export_onnx` and decoded by `OnnxReportGenerator` with its key/value cache; the export counts
in the build time, and the extractor share is not reported), and `onnxruntime-int8` (the same with the linear layers of
`int8`'s scope quantised by ONNX Runtime, `onnx_quantization_cdan.quantize_onnx_int8`), and `onnxruntime-int8-static` (that, with
the visual extractor's convolutions in static int8 as well, `onnx_quantization_cdan.quantize_onnx_extractor_int8`, calibrated on
random views). `VARIANTS` maps each name to a function that
prepares the model and returns a `generate`-like callable: a new backend is one more entry there. The stock stack runs
as it is.

Run:

    python scripts/benchmark_generation.py                                        # full matrix, ~15 min on 2 cores
    python scripts/benchmark_generation.py --batch_sizes 8 --beams 3 --cache on    # the headline setting only
    python scripts/benchmark_generation.py --stacks cdan --batch_sizes 1 --repeats 1  # a quick check
    python scripts/benchmark_generation.py --output_json outputs/my_run.json --threads 4
    python scripts/benchmark_generation.py --stacks cdan --batch_sizes 8 --beams 3 --cache on \
        --variants fp32 int8 compile int8+compile bf16 onnxruntime                # faster-inference rows

Forcing 60 tokens: `max_length=60, min_length=60`. For CDAN (encoder-decoder) both lengths count the decoder start
token, for BERT (decoder-only) they count the one-token `<bos>` prompt, so both generate 59 new tokens. `min_length`
adds `MinLengthLogitsProcessor`, which sets the `<eos>` score to -inf while the sequence is shorter than 60, i.e. at
every step, so no hypothesis ever finishes early. The script checks that every returned sequence has length 60 and
contains no `<eos>`.

Stock BERT under `generate()` (checked against the installed transformers 5.24 source):

* `encoder_hidden_states` is passed as a generate keyword: it is a model kwarg, which `_expand_inputs_for_generation`
  `repeat_interleave`s over beams (every tensor in `model_kwargs` is expanded), and the generic
  `prepare_inputs_for_generation` forwards it to every step. No manual expansion is needed.
* `BertLMHeadModel` is decoder-only (`is_encoder_decoder=False`), so `_prepare_cache_for_generation` gives it a plain
  `DynamicCache`, and `BertCrossAttention` then fails on `cache.is_updated` (`DynamicCache` has no such
  attribute). `BertModel` builds an `EncoderDecoderCache` only when it receives no cache at all. With
  `use_cache=True` the benchmark therefore passes `cache=EncoderDecoderCache(DynamicCache(),
  DynamicCache())` to `generate()`; beam search reorders both of its halves with `EncoderDecoderCache.reorder_cache`.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from benchmark_utils import CpuMeter, markdown_table, peak_rss_mb, wait_for_idle_machine
from torch import nn

from configuration_cdan import CdanConfig
from configuration_d2r import D2RNetConfig
from configuration_priorrg import PriorRGConfig
from inference_cdan import NAMED_OPTIONS, InferenceOptions, optimize_for_inference
from modeling_cdan import CdanForConditionalGeneration
from modeling_d2r import D2RNetForConditionalGeneration
from modeling_priorrg import PriorRGForConditionalGeneration

REPORT_LENGTH = 60
"""Sequence length of every report, start token included (`max_length = min_length = 60`)."""

GENERATED_TOKENS = REPORT_LENGTH - 1
"""Tokens written by `generate()` per report: 59 after the start / `<bos>` token."""

NUM_VIEWS, IMAGE_SIZE = 2, 224
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2

STACK_LABELS = {
    "cdan": "CDAN",
    "stock": "stock ResNet-101+BERT",
    "d2r": "D2R-Net (K=10 boxes)",
    "priorrg": "PriorRG (518 px)",
}

STACK_IMAGE_SIZES = {"priorrg": 518}
"""Image size of the stacks that do not read 224 px views: PriorRG's RAD-DINO-sized ViT reads 518 px."""

D2R_BOXES_PER_VIEW = 10
"""Lesion boxes per view given to D2R-Net (the issue's K = 10): random boxes of 20 to 100 px, all real."""

BASELINE_VARIANT = "fp32"

TARGETS = {
    "cdan_vs_stock_ratio": 1.0,
    "cache_speedup": 3.0,
    "extractor_share": 0.60,
    "peak_rss_mb": 2048.0,
}
"""Targets of the summary: CDAN/stock >= 1.0, cached/uncached >= 3x, extractor share >= 60 %, peak RSS <= 2048 MB."""

STOCK_REFERENCE_REPORTS_PER_SECOND = 3.3
"""Beam-3, batch-8, cached reports/s of the stock stack measured earlier on these 2-core machines."""


class StockResnetBertReportGenerator(nn.Module):
    """
    The reference "stock transformers" stack: HF ResNet-101 patch features of each view, stacked along the token axis
    (2 x 7 x 7 = 98 tokens), projected to 512 and cross-attended by a 3-layer `BertLMHeadModel` decoder.

    Args:
        vocab_size (`int`): report vocabulary size.
        hidden_size (`int`): decoder width.
        num_layers (`int`): decoder layers.
        num_heads (`int`): decoder attention heads.
        ffn_dim (`int`): decoder feed-forward width.
    """

    def __init__(
        self,
        vocab_size: int = 764,
        hidden_size: int = 512,
        num_layers: int = 3,
        num_heads: int = 8,
        ffn_dim: int = 2048,
    ):
        super().__init__()
        from transformers import BertConfig, BertLMHeadModel, ResNetConfig, ResNetModel

        resnet_config = ResNetConfig(
            layer_type="bottleneck",
            depths=[3, 4, 23, 3],
            hidden_sizes=[256, 512, 1024, 2048],
            embedding_size=64,
        )
        self.visual_extractor = ResNetModel(resnet_config)
        self.visual_projection = nn.Linear(resnet_config.hidden_sizes[-1], hidden_size)
        self.decoder_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=ffn_dim,
            is_decoder=True,
            add_cross_attention=True,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        )
        self.decoder = BertLMHeadModel(self.decoder_config)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, V, 3, H, W)` -> projected patch tokens `(B, V*h*w, hidden_size)`."""
        batch_size, num_views = pixel_values.shape[:2]
        feature_maps = self.visual_extractor(pixel_values.flatten(0, 1)).last_hidden_state  # (B*V, 2048, 7, 7)
        patches = feature_maps.flatten(2).transpose(1, 2)  # (B*V, 49, 2048)
        patches = patches.reshape(batch_size, num_views * patches.shape[1], patches.shape[2])  # (B, 98, 2048)
        return self.visual_projection(patches)  # (B, 98, 512)

    def generate(self, pixel_values: torch.Tensor, use_cache: bool = True, **generate_kwargs) -> torch.Tensor:
        """Encode the views once, then run BERT's stock `generate()` from a `<bos>` prompt."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        encoder_hidden_states = self.encode(pixel_values)
        batch_size = pixel_values.shape[0]
        input_ids = torch.full((batch_size, 1), BOS_TOKEN_ID, dtype=torch.long, device=pixel_values.device)
        cache_kwargs = {}
        if use_cache:  # generate() would create a plain DynamicCache, which BertCrossAttention cannot use
            cache_kwargs["cache"] = EncoderDecoderCache(
                DynamicCache(config=self.decoder_config), DynamicCache(config=self.decoder_config)
            )
        return self.decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=encoder_hidden_states,  # expanded over beams by generate() itself
            use_cache=use_cache,
            **cache_kwargs,
            **generate_kwargs,
        )


class ModuleTimer:
    """Wall-clock time spent inside one module's `forward`, accumulated over calls through forward hooks."""

    def __init__(self, module: nn.Module):
        self.seconds = 0.0
        self.calls = 0
        self._start: float | None = None
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, module: nn.Module, args) -> None:
        self._start = time.perf_counter()

    def _after(self, module: nn.Module, args, output) -> None:
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def build_stack(stack: str) -> tuple[nn.Module, nn.Module]:
    """The model of `stack` in eval mode, and its visual extractor module (the one timed by hooks)."""
    if stack == "cdan":
        model = CdanForConditionalGeneration(CdanConfig()).eval()
        return model, model.model.encoder.visual_extractor
    if stack == "stock":
        model = StockResnetBertReportGenerator().eval()
        return model, model.visual_extractor
    if stack == "d2r":  # the published sizes, the alignment text encoder included (it does not run in generate())
        model = D2RNetForConditionalGeneration(D2RNetConfig(max_lesion_boxes=D2R_BOXES_PER_VIEW)).eval()
        return model, model.encoder.visual_extractor
    if stack == "priorrg":  # the published sizes: RAD-DINO-sized DINOv2, 6-layer BERT, DistilGPT-2-sized decoder
        model = PriorRGForConditionalGeneration(PriorRGConfig()).eval()
        return model, model.encoder.vision_model
    raise ValueError(f"Unknown stack {stack!r}; choose one of {list(STACK_LABELS)}.")


class VariantUnavailableError(Exception):
    """A variant of `VARIANTS` cannot run on this machine; its row is skipped with the message."""


GenerateFunction = Callable[..., torch.Tensor]
"""A `generate()`-like callable: `generate(pixel_values=..., max_length=..., num_beams=..., ...) -> sequences`."""


def eager_variant(model: nn.Module) -> tuple[GenerateFunction, nn.Module | None]:
    """The model as built: its `generate` and its visual extractor (timed by hooks)."""
    return model.generate, model.get_encoder().visual_extractor


def optimized_variant(options: InferenceOptions) -> Callable[[nn.Module], tuple[GenerateFunction, nn.Module]]:
    """A variant preparing the model with `optimize_for_inference` (in place, so that memory is not doubled)."""

    def prepare(model: nn.Module) -> tuple[GenerateFunction, nn.Module]:
        prepared = optimize_for_inference(model, **dataclasses.asdict(options), inplace=True)
        return eager_variant(prepared)

    return prepare


CALIBRATION_BATCHES = 2
"""Batches of random views that calibrate the static int8 extractor of `onnxruntime-int8-static` (speed only: a random
model on random views; `scripts/check_inference_agreement.py` calibrates a trained one on its training split)."""


def onnx_runtime_variant(
    model: nn.Module, int8: bool = False, static_extractor: bool = False
) -> tuple[GenerateFunction, None]:
    """
    The model exported to ONNX (`onnx_cdan.export_onnx`, into a temporary folder, counted in the build time) and run
    by ONNX Runtime with as many threads as torch; with `static_extractor`, its visual extractor is quantised to static
    int8, calibrated on `CALIBRATION_BATCHES` batches of random views (`onnx_quantization_cdan.quantize_onnx_extractor_int8`); with
    `int8`, the linear layers of the default int8 scope are quantised by ONNX Runtime (`onnx_quantization_cdan.quantize_onnx_int8`).
    ORT always decodes with its key/value cache; the `use_cache` and `do_sample` arguments of the benchmark's calls are
    dropped (sampling is never asked for).
    """
    from onnx_cdan import OnnxReportGenerator, export_onnx
    from onnx_quantization_cdan import quantize_onnx_extractor_int8, quantize_onnx_int8

    folder = Path(tempfile.mkdtemp(prefix="cdan_onnx_"))
    export_onnx(model, folder)
    if static_extractor:
        generator = torch.Generator().manual_seed(1)
        batches = [benchmark_inputs("cdan", 8, generator)["pixel_values"] for _ in range(CALIBRATION_BATCHES)]
        quantize_onnx_extractor_int8(folder, batches)
    if int8:
        quantize_onnx_int8(folder)
    generator = OnnxReportGenerator(folder, num_threads=torch.get_num_threads())

    def generate(use_cache: bool = True, do_sample: bool = False, **generation_kwargs) -> torch.Tensor:
        return generator.generate(**generation_kwargs)

    return generate, None


VARIANTS: dict[str, Callable[[nn.Module], tuple[GenerateFunction, nn.Module | None]]] = {
    BASELINE_VARIANT: eager_variant,
    **{name: optimized_variant(options) for name, options in NAMED_OPTIONS.items() if not options.is_default},
    "onnxruntime": onnx_runtime_variant,
    "onnxruntime-int8": functools.partial(onnx_runtime_variant, int8=True),
    "onnxruntime-int8-static": functools.partial(onnx_runtime_variant, int8=True, static_extractor=True),
}
"""CDAN variants of `--variants`: each takes the float32 eager model and returns a `generate`-like callable and the
module to time as the visual extractor (`None` where it cannot be hooked: the extractor share is then not reported). A
variant that cannot run on this machine raises `ValueError` with the reason, and its row is skipped."""


def benchmark_inputs(stack: str, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random model inputs of `batch_size` two-view studies: the views, and D2R-Net's boxes (K per view, all real)."""
    image_size = STACK_IMAGE_SIZES.get(stack, IMAGE_SIZE)
    inputs = {"pixel_values": torch.randn(batch_size, NUM_VIEWS, 3, image_size, image_size, generator=generator)}
    if stack == "d2r":
        shape = (batch_size, NUM_VIEWS, D2R_BOXES_PER_VIEW)
        corners = torch.rand(*shape, 2, generator=generator) * (image_size - 100)  # (B, V, K, 2)
        sizes = 20 + torch.rand(*shape, 2, generator=generator) * 80
        inputs["lesion_boxes"] = torch.cat([corners, corners + sizes], dim=-1)  # (B, V, K, 4)
        inputs["lesion_box_mask"] = torch.ones(shape, dtype=torch.bool)
    return inputs


def generate_reports(
    generate: GenerateFunction, inputs: dict[str, torch.Tensor], num_beams: int, use_cache: bool, length: int
) -> torch.Tensor:
    """One `generate()` call forced to exactly `length` tokens (start token included), greedy or beam search."""
    return generate(
        **inputs,
        max_length=length,
        min_length=length,  # MinLengthLogitsProcessor: <eos> gets -inf until the length is reached
        num_beams=num_beams,
        num_return_sequences=1,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def check_full_length(sequences: torch.Tensor, batch_size: int) -> None:
    """Every report has exactly `REPORT_LENGTH` tokens and no `<eos>` (so none stopped early and was padded)."""
    if tuple(sequences.shape) != (batch_size, REPORT_LENGTH):
        raise RuntimeError(f"Expected sequences of shape {(batch_size, REPORT_LENGTH)}, got {tuple(sequences.shape)}.")
    if (sequences[:, 1:] == EOS_TOKEN_ID).any():
        raise RuntimeError("A generated report contains <eos>: min_length did not suppress it.")


def run_single_setting(
    stack: str,
    batch_size: int,
    num_beams: int,
    use_cache: bool,
    repeats: int,
    threads: int,
    seed: int,
    max_foreign_load: float = 0.10,
    max_extra_runs: int = 2,
    max_idle_wait_seconds: float = 30.0,
    variant: str = BASELINE_VARIANT,
) -> dict:
    """
    Build one stack (CDAN prepared as `variant`, see `VARIANTS`), warm it up once and time `generate()` until
    `repeats` uncontended runs are collected (at most `repeats + max_extra_runs` runs); runs inside its own
    subprocess. Throughput comes from the fastest uncontended run (the fastest run overall if every run was
    contended), as `timeit` does. Raises `VariantUnavailableError` when the variant cannot run on this machine.
    """
    if variant != BASELINE_VARIANT and stack != "cdan":
        raise ValueError(f"Variants apply to the CDAN stack only; got {variant!r} for {stack!r}.")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    build_start = time.perf_counter()
    model, visual_extractor = build_stack(stack)
    generate = model.generate
    if stack == "cdan":
        try:
            generate, visual_extractor = VARIANTS[variant](model)
        except ValueError as error:  # e.g. bfloat16 on a CPU without AVX512-BF16 / AMX
            raise VariantUnavailableError(str(error)) from error
    build_seconds = time.perf_counter() - build_start
    rss_after_build_mb = peak_rss_mb()
    inputs = benchmark_inputs(stack, batch_size, torch.Generator().manual_seed(seed))
    timer = ModuleTimer(visual_extractor) if visual_extractor is not None else None

    runs = []
    with torch.inference_mode():
        warmup_start = time.perf_counter()
        check_full_length(generate_reports(generate, inputs, num_beams, use_cache, REPORT_LENGTH), batch_size)
        warmup_seconds = time.perf_counter() - warmup_start
        while len(runs) < repeats + max_extra_runs:
            idle_wait_seconds = wait_for_idle_machine(max_foreign_load, max_idle_wait_seconds)
            if timer is not None:
                timer.reset()
            with CpuMeter() as meter:
                sequences = generate_reports(generate, inputs, num_beams, use_cache, REPORT_LENGTH)
            check_full_length(sequences, batch_size)
            if timer is not None and timer.calls != 1:
                raise RuntimeError(f"The visual extractor ran {timer.calls} times in one generate() call.")
            runs.append(
                {
                    "seconds": meter.seconds,
                    "extractor_seconds": timer.seconds if timer is not None else None,
                    "own_cpu_utilization": meter.own_cpu_utilization,
                    "foreign_load": meter.foreign_load,
                    "contended": meter.foreign_load >= max_foreign_load,
                    "idle_wait_seconds": idle_wait_seconds,
                }
            )
            if sum(not run["contended"] for run in runs) >= repeats:
                break
    if timer is not None:
        timer.remove()

    clean_runs = [run for run in runs if not run["contended"]]
    best = min(clean_runs or runs, key=lambda run: run["seconds"])
    seconds = best["seconds"]
    extractor_seconds = best["extractor_seconds"]
    return {
        "stack": stack,
        "variant": variant,
        "batch_size": batch_size,
        "num_beams": num_beams,
        "use_cache": use_cache,
        "threads": threads,
        "repeats": repeats,
        "seconds_per_generate": seconds,
        "reports_per_second": batch_size / seconds,
        "tokens_per_second": batch_size * GENERATED_TOKENS / seconds,
        "hypothesis_tokens_per_second": batch_size * num_beams * GENERATED_TOKENS / seconds,
        "extractor_seconds": extractor_seconds,
        "total_seconds": seconds,
        "extractor_share": extractor_seconds / seconds if extractor_seconds is not None else None,
        "contended": best["contended"],
        "clean_runs": len(clean_runs),
        "runs": runs,
        "warmup_seconds": warmup_seconds,
        "build_seconds": build_seconds,
        "rss_after_build_mb": rss_after_build_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_in_subprocess(
    stack: str,
    batch_size: int,
    num_beams: int,
    use_cache: bool,
    args: argparse.Namespace,
    variant: str = BASELINE_VARIANT,
) -> dict:
    """
    Run one setting in a fresh interpreter, so its peak resident memory is its own; read its JSON back (`{"skipped":
    reason}` for a variant that cannot run here).
    """
    with tempfile.TemporaryDirectory() as directory:
        result_path = Path(directory) / "result.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--single_setting",
            f"{stack},{batch_size},{num_beams},{'on' if use_cache else 'off'},{variant}",
            "--repeats",
            str(args.repeats or (1 if batch_size >= 32 else 2)),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
            "--max_foreign_load",
            str(args.max_foreign_load),
            "--max_extra_runs",
            str(args.max_extra_runs),
            "--max_idle_wait",
            str(args.max_idle_wait),
            "--result_json",
            str(result_path),
        ]
        environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
        completed = subprocess.run(command, env=environment, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"Setting {command[3]} failed:\n{completed.stderr[-4000:]}")
        return json.loads(result_path.read_text())


def find_row(
    rows: list[dict], stack: str, batch_size: int, num_beams: int, use_cache: bool, variant: str = BASELINE_VARIANT
) -> dict | None:
    for row in rows:
        if (row["stack"], row["batch_size"], row["num_beams"], row["use_cache"], row_variant(row)) == (
            stack,
            batch_size,
            num_beams,
            use_cache,
            variant,
        ):
            return row
    return None


def row_variant(row: dict) -> str:
    """The variant of a row (rows written before `--variants` existed are float32 ones)."""
    return row.get("variant", BASELINE_VARIANT)


def results_table(rows: list[dict]) -> str:
    """
    A Markdown table of the settings; `*` marks a setting whose every timed run was contended. With variant rows (see
    `VARIANTS`) the table gains a `variant` column and each row's speed-up over the float32 row of its setting.
    """
    with_variants = any(row_variant(row) != BASELINE_VARIANT for row in rows)
    table_rows = []
    for row in rows:
        extractor_share = row["extractor_share"]
        cells = [
            STACK_LABELS[row["stack"]],
            row["batch_size"],
            row["num_beams"],
            "on" if row["use_cache"] else "off",
            f"{row['reports_per_second']:.2f}" + ("*" if row["contended"] else ""),
            f"{row['tokens_per_second']:.1f}",
            "n/a" if extractor_share is None else f"{100 * extractor_share:.1f} %",
            f"{row['peak_rss_mb']:.0f}",
        ]
        if with_variants:
            baseline = find_row(rows, row["stack"], row["batch_size"], row["num_beams"], row["use_cache"])
            speedup = row["reports_per_second"] / baseline["reports_per_second"] if baseline else None
            cells[1:1] = [row_variant(row)]
            cells.append("n/a" if speedup is None else f"{speedup:.2f}x")
        table_rows.append(cells)
    header = ["stack", "batch", "beams", "cache", "reports/s", "tokens/s", "extractor share", "peak RSS MB"]
    align = "lrrlrrrr"
    if with_variants:
        header = [header[0], "variant", *header[1:], f"vs {BASELINE_VARIANT}"]
        align = "ll" + align[1:] + "r"
    table = markdown_table(header, table_rows, align=align)
    if any(row["contended"] for row in rows):
        table += "\n\n\\* every timed run of this setting shared the CPUs with other processes (`runs` in the JSON)"
    return table


def summarize(rows: list[dict]) -> dict:
    """The four headline numbers (beam 3, batch 8) with their targets; `None` where a setting was not run."""
    cdan_cached = find_row(rows, "cdan", 8, 3, True)
    cdan_uncached = find_row(rows, "cdan", 8, 3, False)
    stock_cached = find_row(rows, "stock", 8, 3, True)
    cdan_batch8 = [
        row
        for row in rows
        if row["stack"] == "cdan" and row["batch_size"] == 8 and row_variant(row) == BASELINE_VARIANT
    ]

    def verdict(value: float | None, target: float, at_least: bool) -> str:
        if value is None:
            return "n/a"
        return "PASS" if (value >= target if at_least else value <= target) else "FAIL"

    ratio = (
        cdan_cached["reports_per_second"] / stock_cached["reports_per_second"]
        if cdan_cached and stock_cached
        else None
    )
    speedup = (
        cdan_cached["reports_per_second"] / cdan_uncached["reports_per_second"]
        if cdan_cached and cdan_uncached
        else None
    )
    share = cdan_cached["extractor_share"] if cdan_cached else None
    peak = max(row["peak_rss_mb"] for row in cdan_batch8) if cdan_batch8 else None
    return {
        "a_cdan_vs_stock": {
            "cdan_reports_per_second": cdan_cached["reports_per_second"] if cdan_cached else None,
            "stock_reports_per_second": stock_cached["reports_per_second"] if stock_cached else None,
            "stock_reference_reports_per_second": STOCK_REFERENCE_REPORTS_PER_SECOND,
            "ratio": ratio,
            "target": f">= {TARGETS['cdan_vs_stock_ratio']}",
            "verdict": verdict(ratio, TARGETS["cdan_vs_stock_ratio"], at_least=True),
        },
        "b_cdan_cache_speedup": {
            "cached_reports_per_second": cdan_cached["reports_per_second"] if cdan_cached else None,
            "uncached_reports_per_second": cdan_uncached["reports_per_second"] if cdan_uncached else None,
            "speedup": speedup,
            "target": f">= {TARGETS['cache_speedup']}x",
            "verdict": verdict(speedup, TARGETS["cache_speedup"], at_least=True),
        },
        "c_cdan_extractor_share": {
            "share": share,
            "target": f">= {100 * TARGETS['extractor_share']:.0f} %",
            "verdict": verdict(share, TARGETS["extractor_share"], at_least=True),
        },
        "d_cdan_peak_rss_batch8_mb": {
            "peak_rss_mb": peak,
            "settings": len(cdan_batch8),
            "target": f"<= {TARGETS['peak_rss_mb']:.0f} MB",
            "verdict": verdict(peak, TARGETS["peak_rss_mb"], at_least=False),
        },
    }


def format_summary(summary: dict) -> str:
    def number(value: float | None, pattern: str) -> str:
        return "n/a" if value is None else format(value, pattern)

    a, b = summary["a_cdan_vs_stock"], summary["b_cdan_cache_speedup"]
    c, d = summary["c_cdan_extractor_share"], summary["d_cdan_peak_rss_batch8_mb"]
    return "\n".join(
        [
            "Summary (beam 3, batch 8):",
            f"(a) CDAN cached {number(a['cdan_reports_per_second'], '.2f')} reports/s vs stock "
            f"{number(a['stock_reports_per_second'], '.2f')} reports/s (earlier reference "
            f"~{a['stock_reference_reports_per_second']}): ratio {number(a['ratio'], '.2f')}  "
            f"[target {a['target']}: {a['verdict']}]",
            f"(b) CDAN cached {number(b['cached_reports_per_second'], '.2f')} vs uncached "
            f"{number(b['uncached_reports_per_second'], '.2f')} reports/s: speed-up {number(b['speedup'], '.2f')}x  "
            f"[target {b['target']}: {b['verdict']}]",
            f"(c) CDAN extractor share, cached: {number(None if c['share'] is None else 100 * c['share'], '.1f')} %  "
            f"[target {c['target']}: {c['verdict']}]",
            f"(d) CDAN peak RSS at batch 8 (max over {d['settings']} settings): "
            f"{number(d['peak_rss_mb'], '.0f')} MB  [target {d['target']}: {d['verdict']}]",
        ]
    )


def environment_info(threads: int) -> dict:
    import timm
    import transformers

    cpu_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "cpu": cpu_name,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "report_length": REPORT_LENGTH,
        "generated_tokens_per_report": GENERATED_TOKENS,
        "num_views": NUM_VIEWS,
        "image_size": IMAGE_SIZE,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", nargs="+", default=["cdan", "stock"], choices=list(STACK_LABELS))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--cache", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="uncontended timed generate() calls per setting (default: 1 at batch >= 32, else 2); the fastest counts",
    )
    parser.add_argument(
        "--max_foreign_load",
        type=float,
        default=0.10,
        help="a run during which other processes used this share of the machine's CPUs or more counts as contended",
    )
    parser.add_argument(
        "--max_extra_runs", type=int, default=2, help="extra timed runs per setting to replace contended ones"
    )
    parser.add_argument(
        "--max_idle_wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each timed run, for other processes to leave the CPUs (0: do not wait)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default="outputs/benchmark_generation.json")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[BASELINE_VARIANT],
        choices=list(VARIANTS),
        help="CDAN rows prepared for faster inference, each beside the fp32 row of its setting (see the docstring)",
    )
    parser.add_argument("--single_setting", default=None, help=argparse.SUPPRESS)  # "stack,batch,beams,on|off,variant"
    parser.add_argument("--result_json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    if args.single_setting is not None:  # child process: one setting, result as JSON
        stack, batch_size, num_beams, cache, *variant = args.single_setting.split(",")
        try:
            result = run_single_setting(
                stack,
                int(batch_size),
                int(num_beams),
                cache == "on",
                repeats=args.repeats or 1,
                threads=args.threads,
                seed=args.seed,
                max_foreign_load=args.max_foreign_load,
                max_extra_runs=args.max_extra_runs,
                max_idle_wait_seconds=args.max_idle_wait,
                variant=variant[0] if variant else BASELINE_VARIANT,
            )
        except VariantUnavailableError as error:
            result = {"skipped": str(error)}
        Path(args.result_json).write_text(json.dumps(result))
        return

    benchmark_start = time.perf_counter()
    rows, skipped = [], []
    for batch_size in args.batch_sizes:
        for num_beams in args.beams:
            for cache in args.cache:
                for stack in args.stacks:
                    for variant in args.variants if stack == "cdan" else [BASELINE_VARIANT]:
                        setting_start = time.perf_counter()
                        row = run_in_subprocess(stack, batch_size, num_beams, cache == "on", args, variant)
                        label = STACK_LABELS[stack] + ("" if variant == BASELINE_VARIANT else f" {variant}")
                        prefix = (
                            f"[{time.perf_counter() - benchmark_start:7.1f} s] {label:<22} batch {batch_size:>2} "
                            f"beams {num_beams} cache {cache:<3}:"
                        )
                        if "skipped" in row:
                            skipped.append(f"{label}: skipped: {row['skipped']}")
                            print(f"{prefix} skipped: {row['skipped']}", file=sys.stderr, flush=True)
                            continue
                        rows.append(row)
                        share = row["extractor_share"]
                        print(
                            f"{prefix} {row['reports_per_second']:6.2f} reports/s, extractor "
                            f"{'n/a' if share is None else f'{100 * share:5.1f} %'}, peak RSS "
                            f"{row['peak_rss_mb']:6.0f} MB ({row['clean_runs']}/{len(row['runs'])} runs "
                            f"uncontended; setting took {time.perf_counter() - setting_start:.0f} s)",
                            file=sys.stderr,
                            flush=True,
                        )

    runtime_seconds = time.perf_counter() - benchmark_start
    rows.sort(key=lambda row: args.stacks.index(row["stack"]))  # table: one stack after the other
    summary = summarize(rows)
    print(results_table(rows))
    for note in dict.fromkeys(skipped):
        print(f"\n{note}")
    print()
    print(format_summary(summary))
    print(f"\nTotal runtime: {runtime_seconds:.0f} s ({args.threads} threads)")

    output_path = Path(args.output_json)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text(
        json.dumps(
            {
                "environment": environment_info(args.threads),
                "runtime_seconds": runtime_seconds,
                "rows": rows,
                "skipped": sorted(set(skipped)),
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"Wrote {output_path}")


if __name__ == "__main__":
    main()


__all__ = [
    "VARIANTS",
    "ModuleTimer",
    "StockResnetBertReportGenerator",
    "VariantUnavailableError",
    "results_table",
    "run_single_setting",
    "summarize",
]
