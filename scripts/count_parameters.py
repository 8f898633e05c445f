"""Print the parameter count of a CDAN configuration, component by component.

The paper reports 82.25 M parameters for CDAN with ResNet-101. Run:

    python scripts/count_parameters.py                      # the default (paper) configuration
    python scripts/count_parameters.py --vocab_size 4000    # e.g. a MIMIC-CXR-sized vocabulary
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configuration_cdan import CdanConfig  # noqa: E402
from modeling_cdan import CdanForConditionalGeneration  # noqa: E402


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
    args = parser.parse_args()

    config = CdanConfig.from_ablation(args.ablation, visual_extractor=args.visual_extractor, vocab_size=args.vocab_size)
    model = CdanForConditionalGeneration(config)
    rows = component_table(model)
    total = count_parameters(model)
    assert total == sum(count for _, count in rows), "component table does not add up"

    width = max(len(name) for name, _ in rows) + 2
    print(f"CDAN {args.ablation}, {config.visual_extractor}, vocabulary {config.vocab_size}")
    print(f"{'component':<{width}}{'parameters':>14}")
    for name, count in rows:
        print(f"{name:<{width}}{count:>14,}")
    print(f"{'total':<{width}}{total:>14,}  ({total / 1e6:.2f} M; paper: 82.25 M)")
    inference = total - (count_parameters(model.semantic_projection) if model.semantic_projection is not None else 0)
    print(f"{'used at inference':<{width}}{inference:>14,}  ({inference / 1e6:.2f} M)")


if __name__ == "__main__":
    main()
