"""Training speed and memory of CDAN on CPU: end-to-end versus the frozen-extractor cached mode.

    python scripts/benchmark_training.py                       # full-size and demo configurations, 2 threads
    python scripts/benchmark_training.py --configurations demo --steps 3
    python scripts/benchmark_training.py --configurations full-size --precisions fp32 bf16
    python scripts/benchmark_training.py --configurations full-size --precisions fp32 --gradient_checkpointing

Each configuration runs in float32 and, with `--precisions ... bf16`, under bfloat16 autocast (what `train.py --bf16`
does; on CPUs with AVX512-BF16 or AMX it is much faster and stores activations at half the size).

For each configuration (each in a fresh subprocess, so peak resident memory is its own):
- training samples/s and seconds per optimizer step, end to end (Adam with AMSGrad, as train.py);
- the step split into visual extractor, CDAN encoder (projection, reverse attention, 3 layers), decoder (with the LM
  head and losses) and optimizer, each timed forward + backward on its own;
- the semantic-consistency text encoder: train.py embeds each reference report once before training, so its cost
  per step is zero; the one-time cost per report is measured with the offline all-MiniLM-L6-v2 (ClinicalBERT is
  not available offline; it is about 5x larger);
- the cached mode: the extractor is frozen and its features are computed once, so an epoch costs only the encoder,
  decoder and optimizer; the one-time extraction cost is reported beside it;
- peak resident memory of the configuration's process.

Targets for the full-size configuration (ResNet-101, 2 views, 224 px, batch 16, 2 threads): a step no slower than
the R2Gen reference implementation (about 12.3 s on these machines), peak memory at most 6 GB (R2Gen: 8.5 GB), and
the cached mode at least 10x faster per epoch. The table is printed and written as JSON (`--output_json`).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmark_utils import markdown_table, peak_rss_mb
from configuration_cdan import CdanConfig
from modeling_cdan import CdanForConditionalGeneration


CONFIGURATIONS = {
    "full-size": {"visual_extractor": "resnet101", "image_size": 224, "batch_size": 16, "overrides": {}},
    "demo": {
        "visual_extractor": "resnet10t",
        "image_size": 96,
        "batch_size": 16,
        "overrides": {
            "d_model": 128, "encoder_ffn_dim": 256, "decoder_ffn_dim": 256, "encoder_attention_heads": 4,
            "decoder_attention_heads": 4, "reverse_attention_heads": 4, "semantic_dim": 384,
        },  # fmt: skip
    },
}
REPORT_LENGTH = 60
VOCAB_SIZE = 764
TARGETS = {"step_seconds": 12.3, "peak_rss_mb": 6144, "cached_speedup": 10.0}


def timed(function, repeats: int) -> float:
    """Mean wall time of `function()` over `repeats` runs, after one warm-up run."""
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def measure(
    name: str, steps: int, threads: int, precision: str = "fp32", gradient_checkpointing: bool = False
) -> dict:
    """All measurements of one configuration, in this process."""
    torch.set_num_threads(threads)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(0)
    spec = CONFIGURATIONS[name]
    config = CdanConfig(
        visual_extractor=spec["visual_extractor"], vocab_size=VOCAB_SIZE, **spec["overrides"],
    )  # fmt: skip
    model = CdanForConditionalGeneration(config).train()
    if gradient_checkpointing:  # the transformer layers and the timm backbone's stages recompute their activations
        model.gradient_checkpointing_enable()
    batch_size = spec["batch_size"]
    image_size = spec["image_size"]
    pixel_values = torch.randn(batch_size, config.num_views, 3, image_size, image_size)
    labels = torch.randint(4, VOCAB_SIZE, (batch_size, REPORT_LENGTH))
    disease_targets = torch.randint(0, 2, (batch_size, config.num_observations)).float()
    semantic_targets = torch.randn(batch_size, config.semantic_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)

    def cdan_loss(outputs) -> torch.Tensor:
        mlc = torch.nn.functional.binary_cross_entropy_with_logits(outputs.disease_logits.float(), disease_targets)
        sc = torch.nn.functional.mse_loss(outputs.visual_semantics.float(), semantic_targets)
        return outputs.loss + mlc + sc

    def training_step(step_optimizer: torch.optim.Optimizer, **inputs) -> None:
        step_optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = cdan_loss(model(**inputs, labels=labels))
        loss.backward()
        step_optimizer.step()

    step_seconds = timed(lambda: training_step(optimizer, pixel_values=pixel_values), steps)

    encoder, extractor = model.model.encoder, model.model.encoder.visual_extractor
    with torch.no_grad(), autocast:
        visual_features = extractor(pixel_values).float()
        encoder_states = encoder(visual_features=visual_features)

    def extractor_part():
        with autocast:
            features = extractor(pixel_values)
        features.float().sum().backward()

    def encoder_part():
        with autocast:
            outputs = encoder(visual_features=visual_features)
        (outputs.last_hidden_state.float().sum() + outputs.disease_logits.float().sum()).backward()

    def decoder_part():
        with autocast:
            loss = model(encoder_outputs=encoder_states, labels=labels).loss
        loss.backward()

    def optimizer_part():
        optimizer.step()

    split = {
        "extractor": timed(extractor_part, steps),
        "encoder": timed(encoder_part, steps),
        "decoder": timed(decoder_part, steps),
        "optimizer": timed(optimizer_part, steps),
    }
    extractor.requires_grad_(False)
    cached_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, amsgrad=True)

    cached_step_seconds = timed(lambda: training_step(cached_optimizer, visual_features=visual_features), steps)
    with torch.inference_mode(), autocast:
        extraction_seconds = timed(lambda: extractor(pixel_values), 1)

    return {
        "configuration": name,
        "precision": precision + (" + checkpointing" if gradient_checkpointing else ""),
        "visual_extractor": spec["visual_extractor"],
        "image_size": spec["image_size"],
        "batch_size": batch_size,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_seconds": step_seconds,
        "samples_per_second": batch_size / step_seconds,
        "split_seconds": split,
        "cached_step_seconds": cached_step_seconds,
        "cached_speedup_per_epoch": step_seconds / cached_step_seconds,
        "feature_caching_seconds_per_study": extraction_seconds / batch_size,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_text_encoder(threads: int, num_reports: int = 64) -> dict:
    """One-time cost of the SC targets: seconds per report with the offline MiniLM (train.py caches them)."""
    torch.set_num_threads(threads)
    from trainer_cdan import ReportEmbedder

    embedder = ReportEmbedder("offline-minilm")
    report = "the heart is normal in size . the lungs are clear . no pleural effusion or pneumothorax ."
    reports = [report] * num_reports
    seconds = timed(lambda: embedder(reports), 1)
    return {"text_encoder": "all-MiniLM-L6-v2", "seconds_per_report": seconds / num_reports, "per_step_seconds": 0.0}


def results_table(rows: list[dict], text_encoder: dict) -> str:
    """A Markdown table of the configurations: step time and its split, the cached mode, peak memory."""
    header = [
        "configuration", "precision", "batch", "step s", "samples/s", "extractor s", "encoder s", "decoder s",
        "optimizer s", "SC text encoder s/step", "cached step s", "cached speed-up/epoch", "peak RSS MB",
    ]  # fmt: skip
    table_rows = []
    for row in rows:
        split = row["split_seconds"]
        table_rows.append(
            [
                f"{row['configuration']} ({row['visual_extractor']}, {row['image_size']} px)",
                row["precision"],
                row["batch_size"],
                f"{row['step_seconds']:.2f}",
                f"{row['samples_per_second']:.2f}",
                *(f"{split[part]:.2f}" for part in ("extractor", "encoder", "decoder", "optimizer")),
                f"{text_encoder['per_step_seconds']:.1f}",
                f"{row['cached_step_seconds']:.2f}",
                f"{row['cached_speedup_per_epoch']:.1f}x",
                f"{row['peak_rss_mb']:.0f}",
            ]
        )
    return markdown_table(header, table_rows, align="ll" + "r" * (len(header) - 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="Timed steps after one warm-up step.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_json", default="outputs/benchmark_training.json")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:  # child process: measure one configuration and print its JSON
        print(json.dumps(measure(args.single, args.steps, args.threads, args.precision, args.gradient_checkpointing)))
        return

    rows = []
    for name in args.configurations:
        for precision in args.precisions:
            command = [
                sys.executable, __file__, "--single", name, "--precision", precision, "--steps", str(args.steps),
                "--threads", str(args.threads),
            ]  # fmt: skip
            if args.gradient_checkpointing:
                command.append("--gradient_checkpointing")
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"measured {name} {precision}: {rows[-1]['step_seconds']:.2f} s/step", file=sys.stderr)
    text_encoder = measure_text_encoder(args.threads)
    print(results_table(rows, text_encoder))
    print(
        f"\nSC text encoder ({text_encoder['text_encoder']}): {text_encoder['seconds_per_report'] * 1000:.1f} ms per "
        "report, once before training (cached), 0 s per step."
    )
    for row in rows:
        if row["configuration"] != "full-size":
            continue
        checks = {
            "step_seconds": row["step_seconds"] <= TARGETS["step_seconds"],
            "peak_rss_mb": row["peak_rss_mb"] <= TARGETS["peak_rss_mb"],
            "cached_speedup": row["cached_speedup_per_epoch"] >= TARGETS["cached_speedup"],
        }
        label = f"full-size {row['precision']}"
        print(f"{label} step {row['step_seconds']:.2f} s (target <= {TARGETS['step_seconds']} s): "
              f"{'PASS' if checks['step_seconds'] else 'FAIL'}")
        print(f"{label} peak RSS {row['peak_rss_mb']:.0f} MB (target <= {TARGETS['peak_rss_mb']} MB): "
              f"{'PASS' if checks['peak_rss_mb'] else 'FAIL'}")
        print(f"{label} cached mode {row['cached_speedup_per_epoch']:.1f}x faster per epoch (target >= 10x): "
              f"{'PASS' if checks['cached_speedup'] else 'FAIL'}")  # fmt: skip
        row["targets_met"] = checks
    output = Path(args.output_json)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"rows": rows, "text_encoder": text_encoder, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()


__all__ = ["CONFIGURATIONS", "measure", "measure_text_encoder", "results_table"]
