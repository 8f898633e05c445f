"""CDAN with D2R-Net's lesion branch and alignment blocks switched on through its config (`use_lesion_branch`,
`use_lesion_alignment`); the paper's CDAN (both off) is covered by the golden tests of `test_modeling.py`."""

import pytest
import torch
from test_d2r import TINY_TEXT_CONFIG, alignment_inputs, report_labels, study_inputs
from test_modeling import tiny_config

from d2r_modules import ALIGNMENT_TEXT_INPUTS, alignment_text_inputs, global_alignment_loss, local_alignment_loss
from modeling_cdan import CdanForConditionalGeneration
from train import CdanTrainingArguments
from trainer_cdan import CdanTrainer

NUM_PATCHES = 2 * 4 * 4  # two views of 128 px through test_resnet: 4 x 4 patches each


def lesion_cdan(seed: int = 0, **overrides) -> CdanForConditionalGeneration:
    torch.manual_seed(seed)
    fields = dict(
        use_lesion_branch=True, max_lesion_boxes=3, init_std=0.2, dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=False,
    )  # fmt: skip
    return CdanForConditionalGeneration(tiny_config(**{**fields, **overrides})).eval()


def aligned_cdan(seed: int = 0) -> CdanForConditionalGeneration:
    return lesion_cdan(seed, use_lesion_alignment=True, alignment_text_config=TINY_TEXT_CONFIG)


def test_lesion_tokens_follow_u_s_and_padded_ones_are_masked():
    model, inputs = lesion_cdan(), study_inputs()
    with torch.no_grad():
        encoded = model.get_encoder()(**inputs)
    u_s_length = 2 * NUM_PATCHES + 3  # u_p, u_n, u_k
    assert encoded.last_hidden_state.shape[1] == u_s_length + 2 * 3
    assert encoded.memory_mask[:, :u_s_length].all()
    assert torch.equal(encoded.memory_mask[:, u_s_length:], inputs["lesion_box_mask"].flatten(1))


def test_the_decoder_gives_padded_boxes_no_attention():
    model, inputs = lesion_cdan(), study_inputs()
    with torch.no_grad():
        output = model(**inputs, labels=report_labels(), output_attentions=True)
        padded = ~model.get_encoder()(**inputs).memory_mask  # (B, S)
    for weights in output.cross_attentions:  # (B, H, T, S)
        by_token = weights.permute(0, 3, 1, 2)  # (B, S, H, T)
        assert torch.equal(by_token[padded], torch.zeros_like(by_token[padded]))


def test_real_boxes_change_the_report_distribution_of_their_study_only():
    model, inputs = lesion_cdan(), study_inputs()
    moved = {**inputs, "lesion_boxes": inputs["lesion_boxes"].clone()}
    moved["lesion_boxes"][0, 0, 0] = torch.tensor([70.0, 20.0, 120.0, 60.0])
    with torch.no_grad():
        first = model(**inputs, labels=report_labels()).logits
        second = model(**moved, labels=report_labels()).logits
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(first[1], second[1])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_with_masked_memory_equals_uncached(num_beams):
    model, inputs = lesion_cdan(), study_inputs()
    with torch.no_grad():
        cached = model.generate(**inputs, num_beams=num_beams, max_length=12)
        uncached = model.generate(**inputs, num_beams=num_beams, max_length=12, use_cache=False)
        alone = model.generate(**{name: value[1:] for name, value in inputs.items()}, num_beams=num_beams,
                               max_length=12)  # fmt: skip
    assert not torch.equal(cached[0], cached[1])
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1, : alone.shape[1]], alone[0])


def test_cached_visual_features_give_the_same_lesion_features_as_pixels():
    model, inputs = lesion_cdan(), study_inputs()
    with torch.no_grad():
        features = model.get_encoder().visual_extractor(inputs["pixel_values"])
        from_pixels = model.get_encoder()(**inputs)
        from_features = model.get_encoder()(
            visual_features=features, lesion_boxes=inputs["lesion_boxes"], lesion_box_mask=inputs["lesion_box_mask"]
        )
    torch.testing.assert_close(from_pixels.lesion_embeddings, from_features.lesion_embeddings)
    torch.testing.assert_close(from_pixels.last_hidden_state, from_features.last_hidden_state)


def test_boxes_are_refused_without_the_lesion_branch():
    torch.manual_seed(0)
    model = CdanForConditionalGeneration(tiny_config()).eval()
    with pytest.raises(ValueError, match="no lesion branch"):
        model.get_encoder()(**study_inputs())


def test_alignment_losses_are_gab_on_u_and_lab_on_the_lesion_features():
    model, inputs, text = aligned_cdan(), study_inputs(), alignment_inputs()
    output = model(**inputs, **text, labels=report_labels())
    encoded = model.get_encoder()(**inputs)
    text_encoder = model.alignment.text_encoder
    report_states = text_encoder(text["report_text_input_ids"], text["report_text_attention_mask"])
    u = model.get_encoder().visual_projection(model.get_encoder().visual_extractor(inputs["pixel_values"]))
    expected_global = global_alignment_loss(report_states, text["report_text_attention_mask"].bool(), u,
                                            reduction="mean")  # fmt: skip
    sentence_states = text_encoder(
        text["sentence_input_ids"].flatten(0, 1), text["sentence_attention_mask"].flatten(0, 1)
    ).unflatten(0, (2, 3))
    expected_local = local_alignment_loss(
        sentence_states, text["sentence_attention_mask"].bool(), encoded.lesion_embeddings, encoded.lesion_mask,
        reduction="mean",
    )  # fmt: skip
    torch.testing.assert_close(output.global_alignment_loss, expected_global)
    torch.testing.assert_close(output.local_alignment_loss, expected_local)


def test_trainer_adds_both_alignment_terms_to_the_cdan_loss(tmp_path):
    model = aligned_cdan()
    arguments = CdanTrainingArguments(output_dir=str(tmp_path), report_to="none", lambda_mlc=0.5, lambda_sc=0.0,
                                      lambda_alignment=0.7, remove_unused_columns=False)  # fmt: skip
    trainer = CdanTrainer(model=model, args=arguments)
    batch = {
        **study_inputs(),
        **alignment_inputs(),
        "labels": report_labels(),
        "disease_labels": torch.randint(0, 2, (2, 14), generator=torch.Generator().manual_seed(3)).float(),
    }
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        outputs = model(**{name: value for name, value in batch.items() if name != "disease_labels"})
    mlc = torch.nn.functional.binary_cross_entropy_with_logits(
        outputs.disease_logits, batch["disease_labels"], reduction="none"
    ).mean(-1).mean()  # fmt: skip
    expected = outputs.loss + 0.5 * mlc + 0.7 * (outputs.global_alignment_loss + outputs.local_alignment_loss)
    torch.testing.assert_close(loss, expected)
    assert set(ALIGNMENT_TEXT_INPUTS) <= set(trainer.extra_input_names)  # never passed to generate()


def test_alignment_text_inputs_split_reports_into_padded_sentences():
    from transformers import AutoTokenizer

    from trainer_cdan import offline_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(offline_text_encoder_path())
    inputs = alignment_text_inputs(tokenizer, ["the heart is normal . no effusion .", "lungs are clear ."])
    assert inputs["sentence_input_ids"].shape[:2] == (2, 2)
    assert inputs["sentence_attention_mask"][1, 1].sum() == 0  # the second report has one sentence
    second_sentence = inputs["sentence_input_ids"][0, 1][inputs["sentence_attention_mask"][0, 1].bool()]
    assert tokenizer.decode(second_sentence, skip_special_tokens=True) == "no effusion."
    report = inputs["report_text_input_ids"][1][inputs["report_text_attention_mask"][1].bool()]
    assert tokenizer.decode(report, skip_special_tokens=True) == "lungs are clear."


def test_what_sits_in_padded_lesion_rows_does_not_reach_the_real_memory(monkeypatch):
    model, inputs = lesion_cdan(), study_inputs()
    with torch.no_grad():
        reference = model.get_encoder()(**inputs)
        encode_lesions = model.get_encoder().encode_lesions

        def garbage_in_padding(*args):
            embeddings, mask = encode_lesions(*args)
            garbage = 7.0 * torch.linspace(-1.0, 1.0, embeddings.shape[-1])  # not a constant: LayerNorm removes those
            return embeddings + garbage * (~mask)[..., None], mask

        monkeypatch.setattr(model.get_encoder(), "encode_lesions", garbage_in_padding)
        changed = model.get_encoder()(**inputs)
    real = reference.memory_mask
    torch.testing.assert_close(reference.last_hidden_state[real], changed.last_hidden_state[real])
    assert not torch.allclose(reference.last_hidden_state[~real], changed.last_hidden_state[~real])
