"""CDAN report text: the R2Gen report cleaners and the word-level report tokenizer.

Follows R2Gen (Chen et al., "Generating Radiology Reports via Memory-driven Transformer", EMNLP 2020;
github.com/zhjohnchan/R2Gen, `modules/tokenizers.py`): reports are cleaned with the IU X-Ray or MIMIC-CXR rules, the
vocabulary keeps the words seen at least `threshold` times in the training reports, and every report ends with an
end-of-sequence token. The tokenizer is a Transformers 5.x `PreTrainedTokenizerFast` built with the `tokenizers`
library (a `WordLevel` model), so it is saved to and loaded from `tokenizer.json` like any other; [`CdanProcessor`]
(`processing_cdan`) cleans the reports before tokenising them.
"""

import re
from collections import Counter
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


# --------------------------------------------------------------------------------------------------------------------
# Report cleaning (R2Gen rules)
# --------------------------------------------------------------------------------------------------------------------

# R2Gen's sentence filter, kept verbatim as a character class. Inside it `:-\[` is a RANGE from ':' (0x3A) to '['
# (0x5B), so it also removes `;<=>?@` and the capitals A-Z (already lower-cased by then); '-' and digits survive.
SENTENCE_PUNCTUATION_PATTERN = re.compile(r"[.,?;*!%^&_+():-\[\]{}]")
SENTENCE_QUOTE_CHARACTERS = ('"', "/", "\\", "'")

# Enumerations such as "1. Cardiomegaly. 2. Effusion." are flattened into plain sentences, in R2Gen's order.
NUMBERING_REPLACEMENTS = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)


def replace_repeatedly(text: str, old: str, new: str, times: int) -> str:
    """Apply `text.replace(old, new)` `times` times in sequence (R2Gen chains the same replacement)."""
    for _ in range(times):
        text = text.replace(old, new)
    return text


def clean_sentence(sentence: str) -> str:
    """Strip quotes and slashes, lower-case, then delete R2Gen's punctuation class from one sentence."""
    for character in SENTENCE_QUOTE_CHARACTERS:
        sentence = sentence.replace(character, "")
    return SENTENCE_PUNCTUATION_PATTERN.sub("", sentence.strip().lower())


def join_cleaned_sentences(report: str) -> str:
    """Drop enumerations, split the report into sentences, clean each and join them as `s1 . s2 . ... .`.

    Empty sentences are kept, as in R2Gen (whose filter compares a string to `[]` and therefore never drops one).
    """
    for old, new in NUMBERING_REPLACEMENTS:
        report = report.replace(old, new)
    sentences = report.strip().lower().split(". ")
    return " . ".join(clean_sentence(sentence) for sentence in sentences) + " ."


def clean_report_iu_xray(report: str) -> str:
    """
    Clean an IU X-Ray report exactly like R2Gen's `Tokenizer.clean_report_iu_xray`.

    Args:
        report (`str`): the raw findings text.

    Returns:
        `str`: the lower-cased report, words and " . " sentence separators split by single spaces, ending in " .".
    """
    return join_cleaned_sentences(replace_repeatedly(report, "..", ".", 3))


def clean_report_mimic_cxr(report: str) -> str:
    """
    Clean a MIMIC-CXR report exactly like R2Gen's `Tokenizer.clean_report_mimic_cxr`.

    Args:
        report (`str`): the raw findings text (may contain new lines and `___` de-identification runs).

    Returns:
        `str`: the lower-cased report, words and " . " sentence separators split by single spaces, ending in " .".
    """
    report = report.replace("\n", " ")
    report = replace_repeatedly(report, "__", "_", 7)
    report = replace_repeatedly(report, "  ", " ", 6)
    report = replace_repeatedly(report, "..", ".", 8)
    return join_cleaned_sentences(report)


REPORT_CLEANERS: dict[str, Callable[[str], str]] = {
    "iu_xray": clean_report_iu_xray,
    "mimic_cxr": clean_report_mimic_cxr,
}
"""Report cleaners by name; the name is what `CdanProcessor.report_cleaner` stores."""


def get_report_cleaner(name: str | None) -> Callable[[str], str] | None:
    """The cleaner called `name` in `REPORT_CLEANERS`, or `None` for `None`; raises `ValueError` for unknown names."""
    if name is None:
        return None
    if name not in REPORT_CLEANERS:
        raise ValueError(f"Unknown report cleaner {name!r}; choose one of {sorted(REPORT_CLEANERS)} or None.")
    return REPORT_CLEANERS[name]


# --------------------------------------------------------------------------------------------------------------------
# Word-level report tokenizer
# --------------------------------------------------------------------------------------------------------------------

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
"""Special tokens in id order: `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3; vocabulary words start at id 4."""

ANONYMISATION_MARK = "xxxx"
"""IU X-Ray's de-identification mark: the cleaned reports keep it (as R2Gen does) as the word `xxxx` and inside
words such as `x-xxxx` and `xxxx-a-xxxx`; [`CdanProcessor.anonymisation_token_ids`] finds them in the vocabulary."""


def build_report_vocabulary(reports: Iterable[str], threshold: int = 3, cleaner: str | None = "iu_xray") -> list[str]:
    """
    The sorted words seen at least `threshold` times in the cleaned reports (R2Gen's `create_vocabulary`).

    Args:
        reports (`Iterable[str]`): raw training reports.
        threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
        cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): name of the cleaner in `REPORT_CLEANERS`
            applied before counting, or `None` to count the raw whitespace-split words.

    Returns:
        `list[str]`: the kept words in sorted order, special tokens excluded.
    """
    if threshold < 1:
        raise ValueError(f"`threshold` must be at least 1, got {threshold}.")
    clean = get_report_cleaner(cleaner)
    word_counts: Counter[str] = Counter()
    for report in reports:
        if not isinstance(report, str):
            raise TypeError(f"Reports must be strings, got {type(report).__name__}.")
        word_counts.update((clean(report) if clean is not None else report).split())
    return sorted(word for word, count in word_counts.items() if count >= threshold and word not in SPECIAL_TOKENS)


def build_report_tokenizer(
    reports: Iterable[str], threshold: int = 3, cleaner: str | None = "iu_xray", model_max_length: int = 60
) -> PreTrainedTokenizerFast:
    """
    Build CDAN's word-level report tokenizer from training reports, R2Gen style.

    The vocabulary is `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then the sorted words of
    [`build_report_vocabulary`] from id 4. Text is split on whitespace (so it must already be cleaned; the
    [`CdanProcessor`] cleans it), unknown words map to `<unk>`, and encoding appends `<eos>` (no `<bos>`: the model
    shifts the labels right with `<bos>` as decoder start token). Decoding joins words with single spaces.

    Args:
        reports (`Iterable[str]`): raw training reports.
        threshold (`int`, *optional*, defaults to 3): minimum number of occurrences for a word to be kept.
        cleaner (`str` or `None`, *optional*, defaults to `"iu_xray"`): name of the cleaner in `REPORT_CLEANERS`
            applied before counting, or `None`.
        model_max_length (`int`, *optional*, defaults to 60): the tokenizer's `model_max_length` (report length in
            tokens, `<eos>` included).

    Returns:
        [`PreTrainedTokenizerFast`]: the tokenizer, with `pad_token`, `bos_token`, `eos_token` and `unk_token` set.
    """
    words = build_report_vocabulary(reports, threshold=threshold, cleaner=cleaner)
    token_to_id = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *words))}
    word_level_tokenizer = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token=UNK_TOKEN))
    word_level_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos_token_id = token_to_id[EOS_TOKEN]
    word_level_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}",
        pair=f"$A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(EOS_TOKEN, eos_token_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level_tokenizer,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


__all__ = [
    "ANONYMISATION_MARK",
    "REPORT_CLEANERS",
    "SPECIAL_TOKENS",
    "build_report_tokenizer",
    "build_report_vocabulary",
    "clean_report_iu_xray",
    "clean_report_mimic_cxr",
    "get_report_cleaner",
]
