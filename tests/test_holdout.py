"""Guard and calibration rows (swift/holdout.py): image, video and audio rows are refused or passed over (the
measures run the text decoder alone), and the batches are what swift's own collator makes of the rows."""

import pytest
import torch
from datasets import Dataset

from swift_gradpruner.config import GradPruneConfigError
from swift_gradpruner.swift.holdout import MediaRowsError, encode_batches, first_rows, hold_out


def chat(i: int, image: str | None = None) -> dict:
    content = f"{'<image>' if image else ''}What is {i} plus {i}?"
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": f"It is {2 * i}."}]}
    return {**row, "images": [image] if image else []}


def test_held_out_rows_with_images_are_refused_in_one_line():
    data = Dataset.from_list([chat(i, image="x.png" if i % 2 else None) for i in range(200)])
    with pytest.raises(
        MediaRowsError, match=r"held-out rows include \d+ with images.*--gradprune_guard_rows 0"
    ) as info:
        hold_out(data, 32, seed=7)
    assert "\n" not in str(info.value) and isinstance(info.value, GradPruneConfigError)
    text = Dataset.from_list([chat(i) for i in range(200)])
    rest, held = hold_out(text, 32, seed=7)
    assert len(held) == 32 and len(rest) == 168


def test_hold_out_keeps_the_training_rows_in_their_order():
    """Why hold_out is not Dataset.train_test_split (which permutes the remaining rows): phase 1 trains the
    rest in the user's order, and the held-out rows are the seeded sample, sorted."""
    data = Dataset.from_dict({"i": list(range(200))})
    rest, held = hold_out(data, 32, seed=7)
    assert rest["i"] == sorted(rest["i"]) and held["i"] == sorted(held["i"])
    assert not set(rest["i"]) & set(held["i"]) and len(rest) + len(held) == 200
    split = data.train_test_split(test_size=32, seed=7, keep_in_memory=True)
    assert split["train"]["i"] != sorted(split["train"]["i"])


def test_calibration_rows_pass_over_media_rows():
    data = Dataset.from_list([chat(i, image="x.png" if i % 3 == 0 else None) for i in range(60)])
    rows = first_rows(data, 10, seed=1)
    assert len(rows) == 10 and not any(row["images"] for row in rows)
    assert rows == first_rows(data, 10, seed=1)
    assert first_rows(Dataset.from_list([chat(i, image="x.png") for i in range(60)]), 10, seed=1) == []


class MediaTemplate:
    """A template whose encoding carries image inputs, as swift's multimodal templates' does."""

    class tokenizer:  # noqa: N801
        pad_token_id = 0

    @staticmethod
    def encode(row):
        return {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "pixel_values": torch.zeros(1, 3, 4, 4)}


def test_an_encoded_row_with_media_inputs_is_refused_not_skipped():
    """encode_batches skips rows the template cannot encode; a row that encodes to pixel_values is an error."""
    with pytest.raises(MediaRowsError, match=r"encodes to media inputs \(pixel_values\).*--gradprune_score squared"):
        encode_batches(MediaTemplate(), [{"messages": []}], 2)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from swift.model import get_processor
    from swift.template import get_template

    from swift_gradpruner.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_model("llama", num_layers=2, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    template = get_template(get_processor(str(path), model_type="llama", download_model=False), template_type="chatml")
    template.set_mode("train")
    return template


def test_batches_are_what_swifts_collator_makes_of_the_rows(chatml):
    """For a right-padding template without packing, encode_batches pads exactly as template.data_collator."""
    rows = [chat(i) for i in (3, 41, 1234567, 8, 99)]
    ours = encode_batches(chatml, rows, batch_size=2)
    assert [int(b["input_ids"].shape[0]) for b in ours] == [2, 2, 1]
    for start, batch in zip(range(0, 5, 2), ours):
        swift = chatml.data_collator([chatml.encode(row) for row in rows[start : start + 2]])
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], swift[key]), key
    assert ours[0]["attention_mask"][0].sum() != ours[0]["attention_mask"][1].sum()  # padding really happened


def test_a_vision_language_image_row_is_refused(tmp_path):
    """The tiny Gemma 3 VL model with swift's gemma3_vision template: an image row encodes to media inputs
    that encode_batches knows, and is refused; a text row of the same model encodes."""
    from PIL import Image
    from swift.model import get_processor
    from swift.template import get_template

    from swift_gradpruner.swift.holdout import MEDIA_INPUTS
    from swift_gradpruner.tiny_families import create_family

    model_dir, _ = create_family(tmp_path, "gemma3", rows=4)
    processor = get_processor(str(model_dir), model_type="gemma3_vision", download_model=False)
    template = get_template(processor, template_type="gemma3_vision")
    template.set_mode("train")
    Image.new("RGB", (56, 56), (200, 10, 10)).save(tmp_path / "red.png")
    row = chat(2, image=str(tmp_path / "red.png"))
    assert set(template.encode(row)) & set(MEDIA_INPUTS)
    with pytest.raises(MediaRowsError, match="has images, video or audio"):
        encode_batches(template, [chat(1), row], 2)
    assert encode_batches(template, [chat(1)], 2)[0]["input_ids"].shape[0] == 1
