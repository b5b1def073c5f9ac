"""The exported tokenizer: `AutoTokenizer.from_pretrained(DIR)` gives our ids (no BOS added) on the eval
texts, for SentencePiece BPE and unigram models converted with `tokenizers` and for Hugging Face tokenizer
folders; the special token ids are in the config files."""

from __future__ import annotations

import json
import random

import pytest
import torch

from eval_helpers import ALL_TASKS, SHARED_EVAL, WORDS
from polycom_lm.config import ModelConfig
from polycom_lm.data.pydoc_corpus import iter_documents
from polycom_lm.data.tokenizer import load_tokenizer, train_sentencepiece
from polycom_lm.eval import get_task
from polycom_lm.models import build_model
from polycom_lm.pretrained.export import export_model
from polycom_lm.pretrained.loading import LoadedModel

TRICKY = ["\nfoo", "a\nb", "hello  world", " lead", "trail ", "<s> x </s>", "12345 678", "a   b", "\n\n x",
          "é ☃ 中 ü", " ", "  ", "a\n", "\n", "tab\there", "x" * 40, "Café's 3.14, naïve—“quoted”"]


def eval_texts(every: int = 7) -> list[str]:
    """Contexts and context + continuation of the eval sets (every `every`-th example), or synthetic text."""
    texts = list(TRICKY)
    if SHARED_EVAL.is_dir():
        for name in ALL_TASKS:
            for example in get_task(name).examples(SHARED_EVAL)[::every]:
                for request in example.requests:
                    texts += [request.context, request.context + request.continuation]
    else:
        generator = random.Random(0)
        texts += [" ".join(generator.choice(WORDS) for _ in range(20)) for _ in range(200)]
    return texts


def export_tokenizer(tokenizer, out):
    config = ModelConfig(vocab_size=max(tokenizer.vocab_size, 64), d_model=16, n_layers=1, n_heads=2, ffn_hidden_size=16,
                         activation="relu", max_seq_len=32)
    torch.manual_seed(0)
    export_model(LoadedModel(build_model(config), config, tokenizer, out, "run"), out)


def assert_same_ids(tokenizer, folder, texts):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    ours = tokenizer.encode_batch(texts)
    mismatches = [(text, a, b) for text, a, b in zip(texts, ours, (theirs.encode(text) for text in texts)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts differ, e.g. {mismatches[0]}"
    return theirs


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_tokenizers_convert_to_the_same_ids(tmp_path, model_type):
    documents = [document for _, document in zip(range(400), iter_documents("train"))]
    tokenizer = train_sentencepiece(documents, tmp_path / "tokenizer", vocab_size=1200, model_type=model_type,
                                    max_chars=300_000)
    export_tokenizer(tokenizer, tmp_path / "out")
    texts = eval_texts()
    theirs = assert_same_ids(tokenizer, tmp_path / "out", texts)
    assert theirs.decode(theirs.encode("Hello world\n  x")) == tokenizer.decode(tokenizer.encode_batch(["Hello world\n  x"])[0])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (1, 2, 3, 0)
    assert (tmp_path / "out" / "tokenizer.model").is_file()


def test_a_hugging_face_tokenizer_folder_is_exported_without_its_bos_post_processor(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(eval_texts(every=50) * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["[UNK]", "<|endoftext|>", "<|begin|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 2)])
    folder = tmp_path / "hf_tokenizer"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|begin|>"}))
    tokenizer = load_tokenizer(folder)
    export_tokenizer(tokenizer, tmp_path / "out")
    assert_same_ids(tokenizer, tmp_path / "out", eval_texts(every=20))
