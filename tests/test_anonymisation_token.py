"""Banning IU X-Ray's de-identification mark `xxxx` from generated reports (`ban_anonymisation_token`)."""

import pytest
from PIL import Image

from image_processing_cdan import CdanImageProcessor
from pipeline_cdan import CdanReportPipeline
from processing_cdan import CdanProcessor
from test_pipeline import REPORTS, tiny_processor, tiny_report_model


DEIDENTIFIED_REPORTS = [*REPORTS, "XXXX XXXX are intact. Old x-XXXX of the clavicle. The XXXX-a-XXXX is in place."]


def processor_with_anonymisation_words() -> CdanProcessor:
    return CdanProcessor.from_reports(
        DEIDENTIFIED_REPORTS * 3, threshold=1, image_processor=CdanImageProcessor(image_size=64, num_views=2)
    )


def favour_token(model, token_id: int) -> None:
    """Add a large bias to `token_id`'s logit at every decoding step, so the model writes it whenever allowed."""

    def add_bias(module, args, kwargs, output):
        output.logits[..., token_id] += 50.0
        return output

    model.register_forward_hook(add_bias, with_kwargs=True)


@pytest.fixture(scope="module")
def xxxx_reporter() -> CdanReportPipeline:
    processor = processor_with_anonymisation_words()
    model = tiny_report_model(processor)
    favour_token(model, processor.tokenizer.convert_tokens_to_ids("xxxx"))
    return CdanReportPipeline(model=model, processor=processor)


def study() -> Image.Image:
    return Image.linear_gradient("L").resize((64, 64))


def test_processor_finds_the_words_that_carry_the_mark():
    processor = processor_with_anonymisation_words()
    words = processor.tokenizer.convert_ids_to_tokens(processor.anonymisation_token_ids())
    assert words == sorted(words, key=processor.tokenizer.convert_tokens_to_ids)
    assert set(words) == {"xxxx", "x-xxxx", "xxxx-a-xxxx"}


def test_processor_without_the_mark_returns_no_ids():
    assert tiny_processor().anonymisation_token_ids() == []


def test_model_favouring_the_mark_writes_it_without_the_option(xxxx_reporter):
    assert "xxxx" in xxxx_reporter(study())[0]["generated_text"].split()


@pytest.mark.parametrize("where", ["construction", "call"])
def test_banned_mark_is_never_written(xxxx_reporter, where, monkeypatch):
    banned_ids = set(xxxx_reporter.processor.anonymisation_token_ids())
    captured = {}
    original_generate = xxxx_reporter.model.generate

    def capturing_generate(*args, **kwargs):
        captured["ids"] = original_generate(*args, **kwargs)
        return captured["ids"]

    if where == "construction":
        reporter = CdanReportPipeline(
            model=xxxx_reporter.model, processor=xxxx_reporter.processor, ban_anonymisation_token=True
        )
        call_kwargs = {}
    else:
        reporter, call_kwargs = xxxx_reporter, {"ban_anonymisation_token": True}
    monkeypatch.setattr(reporter.model, "generate", capturing_generate)
    report = reporter(study(), num_beams=2, **call_kwargs)[0]["generated_text"]
    assert not banned_ids & set(captured["ids"].flatten().tolist())
    assert "xxxx" not in report
    assert report.strip(), "the model should still write other words"


def test_ban_keeps_the_checkpoints_own_suppressed_tokens(xxxx_reporter):
    processor = xxxx_reporter.processor
    kept_id = processor.tokenizer.convert_tokens_to_ids("heart")
    reporter = CdanReportPipeline(model=xxxx_reporter.model, processor=processor, suppress_tokens=[kept_id])
    assert reporter.anonymisation_suppress_tokens({}) == sorted({kept_id, *processor.anonymisation_token_ids()})


def test_call_can_lift_a_ban_set_at_construction(xxxx_reporter):
    reporter = CdanReportPipeline(
        model=xxxx_reporter.model, processor=xxxx_reporter.processor, ban_anonymisation_token=True
    )
    assert "xxxx" in reporter(study(), ban_anonymisation_token=False)[0]["generated_text"].split()
    assert "xxxx" not in reporter(study())[0]["generated_text"].split()
