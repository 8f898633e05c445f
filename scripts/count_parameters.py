"""Print the parameter count of a CDAN configuration, component by component.

The paper reports 82.25 M parameters for CDAN with ResNet-101. Run:

    python scripts/count_parameters.py                           # the default configuration (69.84 M)
    python scripts/count_parameters.py --model_size paper-82m    # feed-forward widths doubled (82.43 M)
    python scripts/count_parameters.py --vocab_size 4000         # e.g. a MIMIC-CXR-sized vocabulary
"""

import argparse

from benchmark_utils import markdown_table
from configuration_cdan import MODEL_SIZES, CdanConfig
from modeling_cdan import CdanForConditionalGeneration


def count_parameters(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def component_table(model: CdanForConditionalGeneration) -> list[tuple[str, int]]:
    """Parameters of each CDAN component; the tied LM head is counted once, with the word embeddings."""
    encoder, decoder = model.model.encoder, model.model.decoder
    rows = [
        (f"visual extractor ({model.config.visual_extractor})", count_parameters(encoder.visual_extractor)),
        ("visual projection", count_parameters(encoder.visual_projection)),
    ]
    if encoder.reverse_attention is not None:
        rows.append(("reverse attention (+ classifier, disease words)", count_parameters(encoder.reverse_attention)))
        rows.append(("segment embeddings", count_parameters(encoder.segment_embeddings)))
    rows.append(("CDAN encoder layers", count_parameters(encoder.layers) + count_parameters(encoder.layer_norm)))
    rows.append(("word + position embeddings", count_parameters(decoder.embed_tokens) + count_parameters(decoder.embed_positions)))
    rows.append(("decoder layers", count_parameters(decoder.layers) + count_parameters(decoder.layer_norm)))
    if not model.config.tie_word_embeddings:
        rows.append(("LM head", count_parameters(model.lm_head)))
    if model.semantic_projection is not None:
        rows.append(("semantic-consistency projection (training only)", count_parameters(model.semantic_projection)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual_extractor", default="resnet101")
    parser.add_argument("--vocab_size", type=int, default=CdanConfig.vocab_size)
    parser.add_argument("--ablation", default="+RA+SC", help="BASE, +RA, +SC or +RA+SC")
    parser.add_argument("--model_size", default="default", choices=sorted(MODEL_SIZES))
    args = parser.parse_args()

    size = MODEL_SIZES[args.model_size]
    config = CdanConfig.from_ablation(
        args.ablation, **size, visual_extractor=args.visual_extractor, vocab_size=args.vocab_size
    )
    model = CdanForConditionalGeneration(config)
    rows = component_table(model)
    total = count_parameters(model)
    if total != sum(count for _, count in rows):
        raise RuntimeError("The component table does not add up to the model's parameter count.")
    inference = total - (count_parameters(model.semantic_projection) if model.semantic_projection is not None else 0)

    print(f"CDAN {args.ablation}, size {args.model_size}, {config.visual_extractor}, vocabulary {config.vocab_size}\n")
    table_rows = [(name, f"{count:,}") for name, count in rows]
    table_rows += [
        ("**total**", f"**{total:,} ({total / 1e6:.2f} M)**"),
        ("used at inference", f"{inference:,} ({inference / 1e6:.2f} M)"),
        ("the paper", "82.25 M"),
    ]
    print(markdown_table(["component", "parameters"], table_rows))


if __name__ == "__main__":
    main()


__all__ = ["component_table", "count_parameters"]
