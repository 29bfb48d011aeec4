"""MultimodalCollator: labels, expansion, padding, mixed modalities, and clear errors naming sample and field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornstarch.data.collator import MultimodalCollator
from cornstarch.data.media import SampleError
from cornstarch.models.multimodal_language_model import ModalEncoderModule, MultimodalModel, MultimodalProcessor
from tests import tiny

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make(audio: bool = False, chat_template: str | None = None):
    torch.manual_seed(0)
    encoders = {"vision": ModalEncoderModule(tiny.vision_model("clip"))}
    processors = {"vision": tiny.image_processor("clip")}
    if audio:
        encoders["audio"] = ModalEncoderModule(tiny.audio_model("whisper"))
        processors["audio"] = tiny.audio_processor()
    mllm = MultimodalModel(encoders, tiny.llm("llama"))
    tok = tiny.tokenizer()
    tok.chat_template = chat_template
    proc = MultimodalProcessor(processors, tok, model=mllm, predefined_tokens={"vision": "<image>"})
    return mllm, proc


def sample(n_images: int, answer: str = "seven", n_audio: int = 0, seed: int = 0) -> dict:
    prompt = " ".join(["<image>"] * n_images + ["<audio>"] * n_audio + ["which digit ?"])
    return {"prompt": prompt, "answer": answer, "images": tiny.pil_images(n_images, seed=seed),
            "audios": tiny.waveforms(n_audio, seed=seed)}


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE], ids=["plain", "chat_template"])
def test_only_answers_are_supervised(chat_template):
    _, proc = make(chat_template=chat_template)
    batch = MultimodalCollator(proc)([sample(1, "seven"), sample(0, "three two")])
    tok = proc.tokenizer
    for row, answer in zip(batch["labels"], ["seven", "three two"]):
        supervised = row[row != -100].tolist()
        assert supervised == tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, 0] == tok.bos_token_id


def test_mixed_batch_with_0_1_3_images_and_audio_runs_the_model():
    mllm, proc = make(audio=True)
    samples = [sample(0), sample(1), sample(3, n_audio=1), sample(1, n_audio=2)]
    batch = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)(samples)
    assert batch["pixel_values"].shape[0] == 5 and batch["input_features"].shape[0] == 3
    vision = (batch["input_ids"] == proc.token_ids["vision"]).sum(1).tolist()
    audio = (batch["input_ids"] == proc.token_ids["audio"]).sum(1).tolist()
    assert vision == [0, 17, 51, 17] and audio == [0, 0, 16, 32]
    out = mllm(**batch)
    assert torch.isfinite(out.loss)


def test_generate_mode_left_pads_prompts_and_keeps_answers():
    _, proc = make(chat_template=CHAT_TEMPLATE)
    batch = MultimodalCollator(proc, padding_side="left", generate=True)([sample(1, "seven"), sample(0, "two")])
    assert "labels" not in batch and batch["answers"] == ["seven", "two"]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert batch["attention_mask"][1, 0] == 0
    last = proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][:, -1].tolist())
    assert last == [":", ":"], "prompts end with the assistant prompt"


def test_too_long_errors_or_is_skipped_and_counted():
    _, proc = make()
    samples = [sample(1), sample(3), sample(0)]
    media_alone = r"Sample 1, field 'images': its media alone take 51 tokens \(vision 51\), more than max_length=30"
    with pytest.raises(SampleError, match=media_alone + r" \(61 tokens in all\)"):
        MultimodalCollator(proc, max_length=30)(samples)
    collate = MultimodalCollator(proc, max_length=30, on_too_long="skip")
    batch = collate(samples)
    assert collate.skipped == 1 and batch["input_ids"].shape[0] == 2
    assert batch["pixel_values"].shape[0] == 1, "the skipped sample's images are dropped too"


def bad(tmp_path, kind):
    s = sample(1)
    if kind == "missing":
        s["images"] = [str(tmp_path / "nope.png")]
    elif kind == "corrupt":
        (tmp_path / "bad.png").write_bytes(b"not a png")
        s["images"] = [str(tmp_path / "bad.png")]
    elif kind == "unsupported":
        (tmp_path / "x.txt").write_text("hi")
        s["images"] = [str(tmp_path / "x.txt")]
    elif kind == "more_placeholders":
        s["prompt"] = "<image> <image> which"
    elif kind == "fewer_placeholders":
        s["images"] = tiny.pil_images(2)
    elif kind == "empty_answer":
        s["answer"] = "  "
    elif kind == "no_audio_encoder":
        s["audios"] = tiny.waveforms(1)
    return s


@pytest.mark.parametrize("kind,message", [
    ("missing", r"Sample 2, field 'images': image file not found"),
    ("corrupt", r"Sample 2, field 'images': corrupt or unreadable image"),
    ("unsupported", r"Sample 2, field 'images': unsupported image file type '.txt'"),
    ("more_placeholders", r"Sample 2, field 'images': 2 <image> placeholder\(s\) in the text but 1 item\(s\)"),
    ("fewer_placeholders", r"Sample 2, field 'images': 1 <image> placeholder\(s\) in the text but 2 item\(s\)"),
    ("empty_answer", r"Sample 2, field 'answer': turn 1: the assistant's answer is empty"),
    ("no_audio_encoder", r"Sample 2, field 'audios': the model has no encoder for this modality"),
])
def test_bad_samples_name_index_and_field(tmp_path, kind, message):
    _, proc = make()
    samples = [sample(1), sample(0), bad(tmp_path, kind)]
    with pytest.raises(ValueError, match=message):
        MultimodalCollator(proc)(samples)


def test_dataset_index_is_reported_when_given():
    _, proc = make()
    s = bad(None, "more_placeholders") | {"__index__": 417}
    with pytest.raises(SampleError, match="Sample 417"):
        MultimodalCollator(proc)([s])


# ----------------------------------------------------------------------------------------------- properties
_, PROC = make(audio=True)
WORDS = st.lists(st.sampled_from(tiny.WORDS[2:20]), min_size=1, max_size=6).map(" ".join)


@st.composite
def samples(draw):
    n_images = draw(st.integers(0, 3))
    n_audio = draw(st.integers(0, 2))
    marks = ["<image>"] * n_images + ["<audio>"] * n_audio
    words = draw(st.lists(WORDS, min_size=len(marks) + 1, max_size=len(marks) + 1))
    order = draw(st.permutations(marks))
    prompt = " ".join(w + " " + m for w, m in zip(words, list(order) + [""])).strip()
    return {"prompt": prompt, "answer": draw(WORDS), "images": tiny.pil_images(n_images, size=16),
            "audios": tiny.waveforms(n_audio)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(samples(), min_size=1, max_size=4), side=st.sampled_from(["left", "right"]))
def test_collator_properties(batch, side):
    out = MultimodalCollator(PROC, padding_side=side, sampling_rate=tiny.AUDIO_RATE)(batch)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    tok = PROC.tokenizer
    for i, s in enumerate(batch):
        # modality tokens per sample == features per sample
        assert int((ids[i] == PROC.token_ids["vision"]).sum()) == 17 * len(s["images"])
        assert int((ids[i] == PROC.token_ids["audio"]).sum()) == 16 * len(s["audios"])
        # padding agrees with the attention mask, on the requested side only
        real = mask[i].bool()
        n = int(real.sum())
        expected = torch.zeros_like(real)
        if side == "left":
            expected[len(real) - n:] = True
        else:
            expected[:n] = True
        assert torch.equal(real, expected)
        assert (ids[i][~real] == tok.pad_token_id).all()
        # labels are -100 exactly outside the answer, which ends the real tokens
        answer = tok(s["answer"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        supervised = (labels[i] != -100).nonzero().flatten().tolist()
        real_positions = real.nonzero().flatten().tolist()
        assert supervised == real_positions[-len(answer):]
        assert labels[i][supervised].tolist() == answer == ids[i][supervised].tolist()


def test_with_prompts_gives_teacher_forced_and_generation_inputs():
    mllm, proc = make(chat_template=CHAT_TEMPLATE)
    batch = MultimodalCollator(proc, with_prompts=True)([sample(1, "seven"), sample(3, "two")])
    assert batch["answers"] == ["seven", "two"] and "labels" in batch
    prompt, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert pmask[:, -1].tolist() == [1, 1] and pmask[0, 0] == 0, "prompts are left-padded"
    for i in range(2):
        real = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        prompt_real = prompt[i][pmask[i].bool()]
        assert torch.equal(real[: len(prompt_real)], prompt_real), "the prompt is the teacher-forced prefix"
    out = mllm.generate(input_ids=prompt, attention_mask=pmask, pixel_values=batch["pixel_values"], max_new_tokens=2,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (2, prompt.shape[1] + 2)
