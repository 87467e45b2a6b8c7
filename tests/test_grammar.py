"""llguidance's view of a tokenizer, built from our reading of its tokens (grammar.Vocabulary)
rather than from the tokenizer's JSON: the same bytes for every token, the same special tokens,
the same tokenization, for both kinds of tokenizer the families use."""

from pathlib import Path

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from nodes.engine import grammar, models, templates

TEXTS = ["Hello, world!", ' {"name": "Zoë", "tags": ["東京", "🚀"]}\n', "  two  spaces\tand a tab"]


def same_view(tokenizer) -> None:
    assert grammar.Vocabulary.of(tokenizer) is not None  # not the JSON fallback
    n = len(tokenizer)
    ours = grammar._Compiler(tokenizer, n).tokenizer
    theirs = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n)
    assert ours.vocab_size == theirs.vocab_size == n
    different = [i for i in range(n) if ours.decode_bytes([i]) != theirs.decode_bytes([i])
                 or ours.is_special_token(i) != theirs.is_special_token(i)]
    assert not different, [(i, ours.decode_bytes([i]), theirs.decode_bytes([i]))
                           for i in different[:5]]
    for text in TEXTS:
        assert ours.tokenize_str(text) == theirs.tokenize_str(text)


@pytest.mark.timeout(120)
def test_the_default_tokenizer_byte_level_reads_as_llguidance_reads_it(tiny_model):
    same_view(models.lean(models.load_tokenizer(Path(tiny_model))))  # as a node loads it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gemmas_sentencepiece_tokenizer_reads_as_llguidance_reads_it(gemma_gguf):
    """Gemma 3's 262k tokens: SentencePiece pieces with byte fallback and 6k special tokens."""
    folder = models.meta_folder(*models.gguf_file(gemma_gguf))
    # as a node loads it: the saved tokenizer.json read as it is, not rebuilt by GemmaTokenizer
    lean = models.lean(models.load_tokenizer(folder, saved=True))
    full = AutoTokenizer.from_pretrained(folder)
    assert getattr(lean, "_merges", None) is None  # no Python copy, and nothing misses it:
    for text in TEXTS:
        ids = full.encode(text)
        assert lean.encode(text) == ids and lean.decode(ids) == full.decode(ids)
        assert lean.encode(text, add_special_tokens=False) == \
            full.encode(text, add_special_tokens=False)
    assert lean.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(ids)
    assert lean.get_vocab() == full.get_vocab() and len(lean) == len(full)
    assert (lean.bos_token_id, lean.eos_token_id, lean.all_special_ids) == \
        (full.bos_token_id, full.eos_token_id, full.all_special_ids)
    chat = [{"role": "user", "content": TEXTS[1]}]  # the file has no template: a node's own
    assert lean.chat_template is full.chat_template is None
    assert lean.apply_chat_template(chat, chat_template=templates.GEMMA.template, tokenize=True,
                                    add_generation_prompt=True) == \
        full.apply_chat_template(chat, chat_template=templates.GEMMA.template, tokenize=True,
                                 add_generation_prompt=True)
    same_view(lean)
