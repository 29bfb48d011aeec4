"""Bad or unusual media: each is converted correctly (and said once) or refused naming the sample and field."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import soundfile
from PIL import Image

from cornstarch.data import media
from cornstarch.data.collator import LONG_AUDIO_REPORTED, MultimodalCollator
from cornstarch.data.media import SampleError, SampleWarning, load_audio, load_image
from tests import tiny
from tests.data.test_collator import make, sample


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the first conversion of each kind reported again."""
    monkeypatch.setattr(media, "_NOTED", set())


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- images
def test_16_bit_png_is_scaled_to_8_bits_not_clipped():
    levels = np.arange(256, dtype=np.uint16) * 257  # 0, 257, …, 65535: every 8-bit level, 16-bit coded
    data = png_bytes(Image.fromarray(np.tile(levels, (4, 1))))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    with pytest.warns(SampleWarning, match=r"Sample 5, field 'images': 16-bit pixels .* scaled to 8 bits"):
        image = load_image({"bytes": data}, index=5)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (4, 256, 3)
    assert pixels[0, :, 0].tolist() == list(range(256)), "every level kept (convert('RGB') clips them to 0/255)"


def test_16_bit_rgb_array_and_32_bit_mode_I_image_are_scaled():
    rgb16 = np.random.default_rng(0).integers(0, 65536, (3, 5, 3)).astype(np.uint16)
    with pytest.warns(SampleWarning):
        out = np.asarray(load_image(rgb16, index=0))
    assert np.array_equal(out, np.rint(rgb16 / 257).astype(np.uint8))
    mode_i = Image.fromarray(np.array([[0, 65535], [257 * 128, 257]], dtype=np.int32))
    assert mode_i.mode == "I"
    assert np.asarray(load_image(mode_i, index=0))[..., 0].tolist() == [[0, 255], [128, 1]]


def test_float_pixels_in_unit_range_are_scaled_and_reported_once():
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    with pytest.warns(SampleWarning, match=r"Sample 1, field 'images': float32 pixels in \[0, 1\] scaled .* once"):
        first = load_image(unit, index=1)
    assert np.asarray(first)[..., 0].tolist() == np.rint(unit * 255).astype(np.uint8).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(unit, index=2)  # the same conversion again: not reported again


@pytest.mark.parametrize("value,message", [
    (np.array([[0.0, np.nan], [0.5, 1.0]], dtype=np.float32), r"1 pixel value\(s\) are NaN or infinite"),
    (np.array([[0.0, np.inf], [0.5, 1.0]]), r"1 pixel value\(s\) are NaN or infinite"),
    (np.array([[-3.0, 300.0]]), r"float64 pixel values span \[-3.0, 300.0\]; expected \[0, 1\] or \[0, 255\]"),
    (np.array([[0, 70000]], dtype=np.int32), r"int32 pixel values span \[0, 70000\]; expected \[0, 255\] or "
                                              r"\[0, 65535\]"),
    (np.zeros((3, 8, 8), dtype=np.uint8), r"a pixel array of shape \[3, 8, 8\]; expected .* \(channels last\)"),
    (np.zeros((0, 0), dtype=np.uint8), r"the image is empty"),
    (Image.new("RGB", (0, 0)), r"the image is empty \(0×0 pixels\)"),
    (Image.new("L", (7, 0)), r"the image is empty \(7×0 pixels\)"),
])
def test_unusable_pixels_name_sample_and_field(value, message):
    with pytest.raises(SampleError, match=rf"Sample 9, field 'pictures': {message}"):
        load_image(value, index=9, field="pictures")


def test_8_bit_images_are_unchanged():
    rgb = np.random.default_rng(1).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    gray = Image.fromarray(rgb[..., 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report
        assert np.array_equal(np.asarray(load_image(rgb, index=0)), rgb)
        assert np.array_equal(np.asarray(load_image(gray, index=0)), np.asarray(gray.convert("RGB")))
        assert np.array_equal(np.asarray(load_image(np.int64(3) * np.ones((2, 2), np.int64), index=0))[..., 0],
                              np.full((2, 2), 3))


def test_0x0_image_in_a_batch_names_the_sample():
    _, proc = make()
    empty = sample(1) | {"images": [Image.new("RGB", (0, 0))], "__index__": 31}
    with pytest.raises(SampleError, match=r"Sample 31, field 'images': the image is empty"):
        MultimodalCollator(proc)([sample(1), empty])


# ----------------------------------------------------------------------------------------------- audio
def test_channels_first_stereo_is_mixed_down_not_read_as_frames():
    left, right = np.linspace(-1, 1, 1000, dtype=np.float32), np.zeros(1000, np.float32)
    with pytest.warns(SampleWarning, match=r"Sample 4, field 'audios': a 2×1000 audio array read as \[channels, "
                                           r"frames\] \(2 channels\) and mixed down to mono"):
        wave = load_audio(np.stack([left, right]), index=4)
    assert wave.shape == (1000,) and np.array_equal(wave, (left + right) / 2)
    with pytest.warns(SampleWarning, match=r"2-channel audio \(\[frames, channels\]\) mixed down"):
        assert np.array_equal(load_audio(np.stack([left, right], axis=1), index=4), wave)


def test_ambiguous_2d_audio_is_refused():
    with pytest.raises(SampleError, match=r"Sample 2, field 'audios': cannot tell channels from frames in a 20×30"):
        load_audio(np.zeros((20, 30), np.float32), index=2)


@pytest.mark.parametrize("dtype,scale", [(np.int16, 2**15), (np.int32, 2**31), (np.int8, 2**7)])
def test_integer_pcm_is_scaled_to_unit_range(dtype, scale):
    pcm = np.array([0, scale // 2, -scale, scale - 1], dtype=dtype)
    with pytest.warns(SampleWarning, match=rf"Sample 0, field 'audios': {np.dtype(dtype)} samples read as "
                                           rf"{8 * np.dtype(dtype).itemsize}-bit PCM"):
        wave = load_audio(pcm, index=0)
    assert wave.dtype == np.float32
    assert wave.tolist() == pytest.approx([0.0, 0.5, -1.0, (scale - 1) / scale])


def test_unsigned_8_bit_and_int_lists_are_pcm_too():
    with pytest.warns(SampleWarning, match="unsigned 8-bit PCM"):
        assert load_audio(np.array([128, 0, 192], np.uint8), index=0).tolist() == [0.0, -1.0, 0.5]
    media._NOTED.clear()
    with pytest.warns(SampleWarning, match="int64 samples read as 16-bit PCM"):  # e.g. a JSON list of int16 samples
        assert load_audio([0, 16384, -32768], index=0).tolist() == [0.0, 0.5, -1.0]
    with pytest.warns(SampleWarning, match="int64 samples read as 32-bit PCM"):
        media._NOTED.clear()
        assert load_audio([0, 2**30], index=0).tolist() == [0.0, 0.5]


def test_int16_pcm_in_a_dict_and_float_audio_untouched():
    pcm = (np.sin(np.arange(400) / 5) * 20000).astype(np.int16)
    with pytest.warns(SampleWarning):
        wave = load_audio({"array": pcm, "sampling_rate": 16000}, index=0)
    assert np.array_equal(wave, (pcm / 32768).astype(np.float32))
    floats = np.random.default_rng(0).uniform(-1, 1, 300).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(load_audio(floats, index=0), floats)
        assert np.array_equal(load_audio(floats.tolist(), index=0), floats)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_names_sample_and_field(bad):
    wave = np.zeros(100, np.float32)
    wave[[7, 50]] = bad
    with pytest.raises(SampleError, match=r"Sample 8, field 'speech': 2 of 100 audio samples are NaN or infinite "
                                          r"\(the first at sample 7\)"):
        load_audio(wave, index=8, field="speech")


def test_non_finite_audio_file_names_the_sample(tmp_path):
    wave = np.zeros(200, np.float32)
    wave[3] = np.nan
    soundfile.write(tmp_path / "clip.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(SampleError, match=r"Sample 0, field 'audios': 1 of 200 audio samples are NaN"):
        load_audio(str(tmp_path / "clip.wav"), index=0)


def test_nan_audio_in_a_batch_names_the_sample():
    _, proc = make(audio=True)
    broken = sample(0, n_audio=1) | {"__index__": 12}
    broken["audios"] = [np.full(500, np.nan, np.float32)]
    with pytest.raises(SampleError, match=r"Sample 12, field 'audios': 500 of 500 audio samples are NaN"):
        MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)([sample(0, n_audio=1), broken])


# ----------------------------------------------------------------------------------------------- audio window
WINDOW = 2 * tiny.AUDIO_RATE  # the tiny feature extractor keeps chunk_length=2 s


def long_audio_sample(index: int) -> dict:
    return sample(0, n_audio=1) | {"audios": [np.zeros(WINDOW + 640, np.float32)], "__index__": index}


def test_audio_longer_than_the_window_warns_naming_the_sample():
    _, proc = make(audio=True)
    collate = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)
    with pytest.warns(SampleWarning, match=r"Sample 77, field 'audios': audio item 0 lasts 2.25 s \(5760 samples\) "
                                           r"but the audio processor keeps only the first 2.00 s \(5120 samples\)"):
        batch = collate([sample(0, n_audio=1), long_audio_sample(77)])
    assert batch["input_features"].shape[0] == 2, "still collated, as warned"


def test_long_audio_warnings_stop_after_a_few_but_all_are_counted():
    _, proc = make(audio=True)
    collate = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        collate([long_audio_sample(i) for i in range(LONG_AUDIO_REPORTED + 3)])
    messages = [str(w.message) for w in seen if issubclass(w.category, SampleWarning)]
    assert [m.split(",")[0] for m in messages] == [f"Sample {i}" for i in range(LONG_AUDIO_REPORTED)]
    assert messages[-1].endswith("This is the last clip reported; long_audio counts them all.")
    assert collate.long_audio == LONG_AUDIO_REPORTED + 3


def test_audio_longer_than_the_window_can_be_refused():
    _, proc = make(audio=True)
    collate = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE, on_long_audio="error")
    with pytest.raises(SampleError, match=r"Sample 78, field 'audios': audio item 0 lasts 2.25 s"):
        collate([long_audio_sample(78)])
    with pytest.raises(ValueError, match="on_long_audio must be 'warn' or 'error'"):
        MultimodalCollator(proc, on_long_audio="cut")


def test_audio_within_the_window_or_without_truncation_is_silent():
    _, proc = make(audio=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleWarning)
        MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE)([sample(0, n_audio=2)])
        untruncated = MultimodalCollator(proc, sampling_rate=tiny.AUDIO_RATE,
                                         processor_kwargs={"truncation": False, "padding": "longest"})
        assert untruncated._windows == {"audio": None}


def test_the_processor_called_directly_warns_for_audio_it_would_cut():
    _, proc = make(audio=True)
    wave = np.zeros(int(2.25 * tiny.AUDIO_RATE), dtype=np.float32)
    with pytest.warns(UserWarning, match=r"audio item 1: 5760 samples, but its processor keeps only the first 5120"):
        proc(llm_inputs={"text": ["<audio> <audio> hi"]}, encoder_inputs={"audio": {"raw_speech": [wave[:100], wave],
                                                                                      "sampling_rate": tiny.AUDIO_RATE}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proc(llm_inputs={"text": ["<audio> hi"]}, encoder_inputs={"audio": {"raw_speech": [wave[:100]],
                                                                            "sampling_rate": tiny.AUDIO_RATE}})
