"""Text the way people have it: dataset configs, streaming, pre-tokenised columns, and any
hook of the model; every bad setting is a one-line error naming the field."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.harvest.models import ModelError, load_model
from pipeline.harvest.text_sources import TextSourceError, load_documents
from pipeline.harvest.tiny_model import byte_level_tokenizer
from pipeline.harvest.windows import build_windows
from pipeline.manifests.harvest import HookSpec, ModelSpec, TextSpec, TokenizationSpec


class FakeRows(list):
    """Just enough of ``datasets.Dataset`` / ``IterableDataset`` for the loader."""

    column_names = ("text", "input_ids")

    def select(self, indices):
        return FakeRows(self[i] for i in indices)

    def take(self, n):
        return FakeRows(self[:n])


@pytest.fixture
def fake_hub(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    tokenizer = byte_level_tokenizer()
    texts = [f"Document {i}: café, naïve." for i in range(10)]
    rows = FakeRows(
        {"text": t, "input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts
    )

    def load_dataset(name, config=None, **kwargs):
        calls.append({"name": name, "config": config, **kwargs})
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_dataset_passes_config_and_streaming_and_caps_rows(fake_hub):
    spec = TextSpec(
        source="hf_dataset",
        dataset="wikitext",
        dataset_config="wikitext-2-raw-v1",
        streaming=True,
        max_documents=4,
    )
    docs = load_documents(spec)
    assert [d.text for d in docs] == [f"Document {i}: café, naïve." for i in range(4)]
    (call,) = fake_hub
    assert call["name"] == "wikitext" and call["config"] == "wikitext-2-raw-v1"
    assert call["streaming"] is True and call["split"] == "train"


def test_pre_tokenised_column_is_used_as_is_and_decoded_whole(fake_hub):
    tokenizer = byte_level_tokenizer()
    spec = TextSpec(source="hf_dataset", dataset="d", token_field="input_ids")
    docs = load_documents(spec)
    assert all(d.token_ids and d.text == "" for d in docs)
    windows = build_windows(docs, tokenizer, TokenizationSpec(context_length=16, num_tokens=128))
    table = windows.tokens.to_pydict()
    ids = np.asarray(table["token_id"])
    first = np.asarray(table["doc_id"]) == 0
    assert ids[first].tolist() == list(docs_by_title(docs, windows)[0].token_ids)
    assert "".join(t for t, f in zip(table["token_text"], first, strict=True) if f) == (
        docs_by_title(docs, windows)[0].text or tokenizer.decode(ids[first].tolist())
    )
    assert not any("\ufffd" in t for t in table["token_text"])


def docs_by_title(docs, windows):
    titles = windows.documents["title"].to_pylist()
    by_title = {d.title: d for d in docs}
    return [by_title[t] for t in titles]


def test_missing_column_is_a_one_line_error(fake_hub):
    spec = TextSpec(source="hf_dataset", dataset="d", dataset_config="c", token_field="ids")
    with pytest.raises(TextSourceError, match=r"^d \(c\): no column 'ids' \(text.token_field\)"):
        load_documents(spec)


def test_files_with_a_token_column(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(
        "".join(json.dumps({"ids": [72, 105], "title": f"t{i}"}) + "\n" for i in range(3))
    )
    docs = load_documents(TextSpec(source="files", paths=(str(path),), token_field="ids"))
    assert [d.token_ids for d in docs] == [(72, 105)] * 3
    path.write_text(json.dumps({"ids": "not ids"}) + "\n")
    with pytest.raises(TextSourceError, match="not a list of token ids"):
        load_documents(TextSpec(source="files", paths=(str(path),), token_field="ids"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({"source": "hf_dataset", "dataset": "d", "streaming": True}, "needs text.max_documents"),
        ({"source": "wiki_summaries", "streaming": True}, "need source 'hf_dataset'"),
        ({"source": "wiki_summaries", "token_field": "ids"}, "token_field needs source"),
    ],
)
def test_bad_text_settings_name_the_field(text, message):
    with pytest.raises(ValidationError, match=message):
        TextSpec.model_validate(text)


def test_hook_point_spellings():
    assert HookSpec(point="hook_mlp_out").point == "mlp_out"
    assert HookSpec(point="mlp_out").suffix == "hook_mlp_out"
    assert HookSpec(point="ln2.hook_normalized").suffix == "ln2.hook_normalized"
    with pytest.raises(ValidationError, match="not a hook name inside a block"):
        HookSpec(point="blocks.0.hook_resid_post")


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(ModelSpec(source="random"), "cpu")


def test_any_block_hook_of_model_width_is_accepted(tiny_model):
    for point in ("resid_mid", "hook_resid_pre", "ln2.hook_normalized", "attn.hook_out"):
        names = tiny_model.hook_names(HookSpec(layers=(1, 2), point=point))
        assert names[0].startswith("blocks.1.") and names[0].endswith(point.split("hook_")[-1])


def test_unknown_hook_lists_close_matches(tiny_model):
    with pytest.raises(ModelError, match=r"no hook blocks\.0\.hook_resid_pots.*resid_post"):
        tiny_model.hook_names(HookSpec(layers=(0,), point="resid_pots"))


def test_hook_of_the_wrong_shape_is_refused(tiny_model):
    with pytest.raises(ModelError, match=r"attn\.hook_pattern gives activations of shape"):
        tiny_model.hook_names(HookSpec(layers=(0,), point="attn.hook_pattern"))
