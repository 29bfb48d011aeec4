"""Train-step benchmark: cornstarch ``MultimodalModel`` vs transformers ``LlavaForConditionalGeneration`` (CPU).

All parts use one Llava-shaped configuration (``LLAVA_SHAPED``): a CLIP-style tower (hidden 128, 4 layers, 64×64
images in 8×8 patches: 64 patches + CLS), a Llama-style LM (hidden 256, 4 layers, vocab 32 000), batch 4, 65 image
tokens + 48 text tokens per sample of which only the last 16 (the answer) are supervised. The two models hold
*identical* weights and see the *identical* batch; before timing, their losses are asserted equal within 1e-5.
A step is forward + backward + ``AdamW.step()`` (fused, transformers' default optimizer) + ``zero_grad``. Steps of
the compared models alternate (A B, B A, …); after ``--warmup`` rounds the median of ``--repeats`` is reported.

[1] all parts trainable: HF Llava (layer -2 with CLS, ``"full"``) vs cornstarch (``feature_layer=-2``: the tower
    stops at layer -2; logits and loss only at the supervised columns). Target: HF/cs >= 1.5.
[2] vision tower frozen in both: time (target HF/cs >= 1.7) and peak memory of a step, measured by torch's
    memory profile (parameters, gradients, optimizer state, activations, temporaries; target cs/HF <= 0.7);
    also cornstarch with its memory options: activation checkpointing of the LM and tower layers
    (``gradient_checkpointing``) and ``optimizer.in_backward`` (each parameter stepped during backward, its
    gradient freed at once).
[3] Llava's default selection (layer -2, CLS dropped), cornstarch both ways: ``feature_layer=-2`` + ``without_cls``
    (later layers never computed) vs ``request_hidden_states`` + ``penultimate_layer_without_cls`` (every layer
    computed, the reference page's way). Same loss; reported for the vision encoder alone (tower + projector;
    target >= 1.2) and for the whole train step, with the tower frozen (Llava's usual setting: the tower's work
    is its forward pass) and trainable (backward never enters the unused last layer either way, so only its
    forward is saved: expect less).
[4] length-skewed data (answers of 4–200 tokens), cornstarch: real (non-pad) tokens per second of one pass over
    the data with plain shuffled batches of 4, length-grouped batches of 4 (``LengthGroupedSampler``) and packed
    rows (``first_fit_decreasing`` + ``pack_batch``: 4 rows of the longest sample's length per step), and plain
    batches with logits at every position (``supervised_logits_only=False``, transformers' way, where padding
    also costs LM-head and loss work). Target: >= 1.5 over plain. Each
    sample's loss in a grouped or packed batch is checked against the sample run alone (within 1e-5).

[5] the LM head + cross-entropy alone at a large vocabulary (Llama 3's 128 256; 1024 supervised tokens, hidden 256):
    computed apart (the LM's head, then the loss on its ``[tokens, vocab]`` logits) vs fused in chunks of 256 tokens
    (``MultimodalModel.loss_chunk_size``, :mod:`cornstarch.models.multimodal_language_model.chunked_loss`): time
    and peak memory of forward + backward, same loss.

Part 2 also prints the floor of any train step that holds every gradient before ``optimizer.step()``: parameters +
gradients + AdamW's moments, as a share of HF's peak. Part 4 also counts each pass's FLOPs (torch's
``FlopCounterMode``) and those of every sample run alone, without padding: the most any arrangement can save.

Every part prints ``other CPU``: the share of the machine's CPUs that *other* processes used while timing (from
``/proc/stat``); above 10% the timings are flagged (a concurrent job makes OpenMP threads wait for each other).

Run from the repository root: ``python bench/step_vs_hf_llava.py`` (``--quick`` for a smoke run on a smaller
model, a few seconds; ``--parts 1 3`` for some parts).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cornstarch.data.packing import first_fit_decreasing, pack_batch  # noqa: E402
from cornstarch.data.sampling import LengthGroupedSampler  # noqa: E402
from cornstarch.lit.step_in_backward import StepInBackward  # noqa: E402
from cornstarch.models.feature_selection import (  # noqa: E402
    penultimate_layer_without_cls,
    request_hidden_states,
    without_cls,
)
from cornstarch.models.multimodal_language_model import (  # noqa: E402
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)
from cornstarch.models.multimodal_language_model.chunked_loss import chunked_head_loss  # noqa: E402
from cornstarch.batch import IGNORE_INDEX, next_labels  # noqa: E402
from cornstarch.models.multimodal_language_model.supervised_loss import (  # noqa: E402
    causal_lm_loss,
    next_token_targets,
    per_sample_loss,
)

PAD = 0
LOSS_ATOL = 1e-5
MB = 2**20
BUSY_WARNING = 0.10  # share of the CPUs used by other processes above which timings are flagged


@dataclasses.dataclass(frozen=True)
class Spec:
    """The model and batch shape: a CLIP vision tower (``vision_*``) and a Llama LM (``lm_*``)."""

    name: str
    vision_hidden: int = 128
    vision_layers: int = 4
    lm_hidden: int = 256
    lm_layers: int = 4
    vocab: int = 32_000
    image_size: int = 64
    patch: int = 8
    batch: int = 4
    text_tokens: int = 48  # per sample: 16 before the image, 16 after it, then the answer
    answer_tokens: int = 16  # supervised

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1  # inside the LM vocabulary, as Llava needs

    def describe(self) -> str:
        return (f"vision {self.vision_layers}x{self.vision_hidden} ({self.patches} patches + CLS), LM "
                f"{self.lm_layers}x{self.lm_hidden}, vocab {self.vocab}, batch {self.batch}, {self.patches + 1} image "
                f"+ {self.text_tokens} text tokens/sample, last {self.answer_tokens} supervised")


LLAVA_SHAPED = Spec("llava-shaped")
QUICK = Spec("quick", vision_hidden=32, vision_layers=3, lm_hidden=64, lm_layers=2, vocab=4096, image_size=32)


# ----------------------------------------------------------------------------------------------- models
def _heads(hidden: int) -> int:
    return max(2, hidden // 64)


def build_llava(spec: Spec, strategy: str, seed: int = 0) -> tf.LlavaForConditionalGeneration:
    """Llava with ``vision_feature_layer=-2`` and the given select strategy (``"full"`` keeps CLS)."""
    vision = tf.CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=_heads(spec.vision_hidden),
        image_size=spec.image_size, patch_size=spec.patch,
    )
    text = tf.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.lm_hidden, intermediate_size=3 * spec.lm_hidden,
        num_hidden_layers=spec.lm_layers, num_attention_heads=_heads(spec.lm_hidden), max_position_embeddings=1024,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=spec.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    ))


def cornstarch_from_llava(llava: tf.LlavaForConditionalGeneration, truncate: bool = True) -> MultimodalModel:
    """A ``MultimodalModel`` with copies of ``llava``'s weights and the same feature selection.

    ``truncate``: select layer -2 with ``feature_layer`` (later layers dropped); else with the hidden-states
    callbacks (every layer computed; only for the ``"default"`` strategy).
    """
    config = llava.config
    clip = copy.deepcopy(llava.model.vision_tower)  # a CLIPVisionModel
    llama = tf.LlamaForCausalLM(config.text_config)
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    src = llava.model.multi_modal_projector
    projector = MultimodalProjector(MultimodalProjectorConfig(
        in_features=src.linear_1.in_features, out_features=src.linear_2.out_features, projection_type="mlp",
        activation=config.projector_hidden_act,
    ))
    projector.projection[0].load_state_dict(src.linear_1.state_dict())
    projector.projection[2].load_state_dict(src.linear_2.state_dict())
    drop_cls = config.vision_feature_select_strategy == "default"
    if truncate:
        selection = dict(feature_layer=-2, postprocess_module_callback=without_cls if drop_cls else None)
    else:
        assert drop_cls, "the callbacks implement the 'default' strategy"
        selection = dict(preprocess_callback=request_hidden_states,
                         postprocess_module_callback=penultimate_layer_without_cls)
    mllm = MultimodalModel({"vision": ModalEncoderModule(clip, projector=projector, **selection)}, llama)
    mllm.set_modality_token_ids({"vision": config.image_token_id})
    return mllm


SKIPS = "hf_skips"  # the results' key of LlavaWithTheSameSkips


class LlavaWithTheSameSkips(torch.nn.Module):
    """HF Llava's own code doing only the work cornstarch does: the bound of skipping work.

    cornstarch's train step differs from Llava's by two skips: logits and loss only where a token is supervised, and
    the tower stopped at the selected layer. Both are open to Llava's own forward: transformers' ``logits_to_keep``
    (a boolean ``[batch, seq]`` mask: the positions whose next token is supervised) and a copy of the model whose
    tower ends at ``vision_feature_layer`` (its later layers dropped, the selection then its last hidden state).
    What remains is the same decoder and tower layers run by transformers' own code, so ``HF / this`` is the most
    skipping work gives on a machine; a larger ratio needs transformers' layers to run faster than transformers
    runs them (compiling). The loss (mean cross-entropy over the supervised tokens) equals Llava's and cornstarch's.

    Args:
        llava: the model to copy (left unchanged; the copy holds equal weights).

    >>> llava = build_llava(QUICK, "full")
    >>> batch = make_batch(QUICK)
    >>> abs(loss_of(LlavaWithTheSameSkips(llava), batch) - loss_of(llava, batch)) < 1e-5
    True
    """

    def __init__(self, llava: tf.LlavaForConditionalGeneration):
        super().__init__()
        self.llava = copy.deepcopy(llava)
        config, tower = self.llava.config, self.llava.model.vision_tower
        layers = tower.encoder.layers
        kept = len(layers) + 1 + config.vision_feature_layer  # hidden_states[0] is the embeddings' output
        tower.encoder.layers = layers[:kept]
        tower.config.num_hidden_layers = config.vision_config.num_hidden_layers = kept
        config.vision_feature_layer = -1

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                labels: torch.Tensor) -> SimpleNamespace:
        targets = next_labels(labels)  # [batch, seq]: the label each position predicts
        next_supervised = targets != IGNORE_INDEX
        logits = self.llava(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            logits_to_keep=next_supervised).logits  # [supervised tokens, vocab]
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.float(), targets[next_supervised]))


def freeze_vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, MultimodalModel):
        model.train(encoders_mode={"vision": (False, True)}, llm_mode=True)
    else:
        llava = model.llava if isinstance(model, LlavaWithTheSameSkips) else model
        llava.model.vision_tower.requires_grad_(False)
    return model


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)


# ----------------------------------------------------------------------------------------------- data
def sample_ids(spec: Spec, answer: int, g: torch.Generator,
               image_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample: 16 text, the image's placeholders (default: patches + CLS), 16 text, ``answer`` supervised."""
    image_tokens = spec.patches + 1 if image_tokens is None else image_tokens
    text = torch.randint(3, spec.image_token_id, (32 + answer,), generator=g)
    ids = torch.cat([text[:16], torch.full((image_tokens,), spec.image_token_id), text[16:]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-answer:] = ids[-answer:]
    return ids, labels


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-padded batch of ``samples`` (ids, labels) with one image each."""
    length = max(len(ids) for ids, _ in samples)
    batch = {"input_ids": torch.full((len(samples), length), PAD),
             "labels": torch.full((len(samples), length), IGNORE_INDEX),
             "attention_mask": torch.zeros(len(samples), length, dtype=torch.long)}
    for i, (ids, labels) in enumerate(samples):
        batch["input_ids"][i, :len(ids)], batch["labels"][i, :len(ids)] = ids, labels
        batch["attention_mask"][i, :len(ids)] = 1
    return {**batch, "pixel_values": pixels}


def make_batch(spec: Spec, seed: int = 0, image_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """``spec.batch`` samples of equal length (no padding), answers the last ``spec.answer_tokens`` tokens.

    ``image_tokens``: placeholders per image (default patches + CLS; ``spec.patches`` for Llava's "default").
    """
    g = torch.Generator().manual_seed(seed)
    samples = [sample_ids(spec, spec.answer_tokens, g, image_tokens) for _ in range(spec.batch)]
    return collate(samples, torch.randn(spec.batch, 3, spec.image_size, spec.image_size, generator=g))


# ----------------------------------------------------------------------------------------------- measuring
def make_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def cpu_clock() -> tuple[float, float, float] | None:
    """``(wall s, busy CPU s of the whole machine, CPU s of this process)``; None without Linux ``/proc/stat``."""
    try:
        jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = jiffies
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, time.process_time()


def foreign_cpu_share(since: tuple[float, float, float] | None) -> float:
    """Share of all CPUs that *other* processes used since ``cpu_clock()`` returned ``since`` (NaN if unknown)."""
    now = cpu_clock()
    if since is None or now is None:
        return float("nan")
    wall, busy, own = (b - a for a, b in zip(since, now))
    return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def interleaved_median_ms(steps: dict[str, Callable[[], None]], warmup: int,
                          repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per call of each callable, run in alternating order (ABAB… reversed every round).

    Returns the medians and the share of the CPUs other processes used meanwhile (see ``foreign_cpu_share``).
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    clock = cpu_clock()
    for round_ in range(warmup + repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}, foreign_cpu_share(clock)


@torch.no_grad()
def loss_of(model: torch.nn.Module, batch: dict) -> float:
    return model(**batch).loss.item()


def assert_same_loss(models: dict[str, torch.nn.Module], batch: dict) -> float:
    """Both models' training losses on ``batch`` agree within ``LOSS_ATOL``; returns the difference."""
    (a, ma), (b, mb) = models.items()
    la, lb = loss_of(ma, batch), loss_of(mb, batch)
    assert abs(la - lb) <= LOSS_ATOL, f"loss of {a} {la} != loss of {b} {lb}"
    return abs(la - lb)


def make_step_in_backward(model: torch.nn.Module, batch: dict,
                          optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A train step whose AdamW updates happen during backward (``OptimizerConfig(in_backward=True)``)."""
    StepInBackward(optimizer).attach()

    def step() -> None:
        model(**batch).loss.backward()  # each parameter stepped, its gradient freed, as backward reaches it
    return step


def peak_step_bytes(model: torch.nn.Module, batch: dict, in_backward: bool = False) -> int:
    """Peak bytes alive during a train step (parameters, gradients, AdamW state, activations, temporaries).

    The second step (AdamW state exists by then) is recorded by ``torch.profiler`` with memory profiling; its
    memory timeline (every tensor's creation and destruction, plus those alive before) gives the peak.
    """
    optimizer = adamw(model)
    step = (make_step_in_backward if in_backward else make_step)(model, batch, optimizer)
    step()
    return peak_bytes(step)


def peak_bytes(run: Callable[[], None]) -> int:
    """Peak bytes of tensors alive while ``run()`` runs (those alive before it included), from torch's memory
    profile: every tensor's creation and destruction."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    alive = peak = 0
    for _time, action, _key, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            alive += size
        elif action == Action.DESTROY:
            alive -= size
        peak = max(peak, alive)
    return peak


# ----------------------------------------------------------------------------------------------- parts
def bench_vs_hf(spec: Spec, frozen: bool, warmup: int, repeats: int) -> dict:
    """[1]/[2]: HF Llava vs cornstarch, all trainable or with the vision tower frozen in both."""
    llava = build_llava(spec, "full").train()
    mllm = cornstarch_from_llava(llava).train()
    if frozen:
        freeze_vision_tower(llava), freeze_vision_tower(mllm)
    batch = make_batch(spec)
    models = {"hf": llava, "cs": mllm}
    dloss = assert_same_loss(models, batch)
    variants = {n: (m, False) for n, m in models.items()}
    if frozen:  # cornstarch's memory options too: activation checkpointing, the AdamW step inside backward
        for name, checkpointing, in_backward in CS_MEMORY_OPTIONS:
            variant = copy.deepcopy(mllm)
            if checkpointing:
                variant.gradient_checkpointing_enable()
            variants[name] = (variant, in_backward)
    ms, busy = interleaved_median_ms(
        {n: (make_step_in_backward if ib else make_step)(m, batch, adamw(m)) for n, (m, ib) in variants.items()},
        warmup, repeats)
    row = {"ms": ms, "dloss": dloss, "busy": busy}
    if frozen:
        row["peak"] = {n: peak_step_bytes(copy.deepcopy(m), batch, in_backward=ib) for n, (m, ib) in variants.items()}
        row["floor"] = gradient_floor_bytes(mllm)
    return row


def gradient_floor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, plus the gradient and AdamW's two moments of each trainable one: what is alive
    when ``optimizer.step()`` starts after a backward, whatever the model does in forward and backward."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + 3 * trained


# (name, activation checkpointing, optimizer.in_backward)
CS_MEMORY_OPTIONS = [("cs + in_backward", False, True), ("cs + checkpointing", True, False),
                     ("cs + checkpointing + in_backward", True, True)]


def vision_step(model: MultimodalModel, pixels: torch.Tensor, backward: bool) -> Callable[[], None]:
    """The vision encoder (tower + projector) alone: forward, and backward if ``backward``."""
    def step() -> None:
        with torch.set_grad_enabled(backward):
            features = model.vision_encoder(pixel_values=pixels)  # [n_features, llm_hidden]
        if backward:
            features.sum().backward()
            model.zero_grad(set_to_none=True)
    return step


def bench_feature_layer(spec: Spec, warmup: int, repeats: int) -> dict:
    """[3]: Llava's default selection, the layers after -2 dropped vs computed; tower trainable and frozen."""
    llava = build_llava(spec, "default")
    batch = make_batch(spec, image_tokens=spec.patches)
    results = {"busy": 0.0}
    for mode in ("frozen", "trainable"):
        models = {"computed": cornstarch_from_llava(llava, truncate=False).train(),
                  "dropped": cornstarch_from_llava(llava, truncate=True).train()}
        if mode == "frozen":
            for m in models.values():
                freeze_vision_tower(m)
        else:
            assert abs(loss_of(llava.train(), batch) - loss_of(models["dropped"], batch)) <= LOSS_ATOL
        results["dloss"] = assert_same_loss(models, batch)
        enc_ms, busy = interleaved_median_ms(
            {n: vision_step(m, batch["pixel_values"], backward=mode == "trainable") for n, m in models.items()},
            warmup, repeats)
        step_ms, busy2 = interleaved_median_ms({n: make_step(m, batch, adamw(m)) for n, m in models.items()},
                                               warmup, repeats)
        results[mode] = {"encoder": enc_ms, "step": step_ms}
        results["busy"] = max(results["busy"], busy, busy2)
    return results


def skewed_samples(spec: Spec, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` samples whose answers are 4–200 tokens, most of them short (log-uniform)."""
    g = torch.Generator().manual_seed(seed)
    answers = torch.exp(torch.empty(n).uniform_(torch.log(torch.tensor(4.0)).item(),
                                                torch.log(torch.tensor(200.0)).item(), generator=g)).round().long()
    return [sample_ids(spec, int(a), g) for a in answers]


def arrangements(spec: Spec, samples: list, pixels: torch.Tensor, seed: int = 0) -> dict[str, list[dict]]:
    """The batches of one pass over ``samples``: plain (shuffled), length-grouped, packed rows."""
    n, b = len(samples), spec.batch
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    lengths = [len(ids) for ids, _ in samples]
    grouped = list(LengthGroupedSampler(lengths, batch_size=b, group_size=n // b, seed=seed))

    def batches(indices: list[int]) -> list[dict]:
        return [collate([samples[i] for i in chunk], pixels[chunk])
                for chunk in (indices[j:j + b] for j in range(0, n, b))]

    capacity = max(lengths)
    bins = first_fit_decreasing([lengths[i] for i in order], capacity)  # rows of samples, positions in `order`
    row_order = torch.randperm(len(bins), generator=torch.Generator().manual_seed(seed)).tolist()
    laid_out = [order[j] for k in row_order for j in bins[k]]  # samples row after row, rows shuffled
    everything = collate([samples[i] for i in laid_out], pixels[laid_out])
    packed, sample_of_token = pack_batch(everything, capacity=capacity)
    packed_batches = []
    for j in range(0, packed["input_ids"].shape[0], b):
        rows = slice(j, j + b)
        members = sample_of_token[rows].unique()
        members = members[members >= 0]  # positions in `order`, ascending: the images' order in these rows
        packed_batches.append({"input_ids": packed["input_ids"][rows], "labels": packed["labels"][rows],
                               "position_ids": packed["position_ids"][rows],
                               "pixel_values": everything["pixel_values"][members]})
    return {"plain": batches(order), "grouped": batches(grouped), "packed": packed_batches}


def check_per_sample_losses(model: MultimodalModel, samples: list, pixels: torch.Tensor) -> float:
    """Max |loss in a packed row - loss alone| over the first samples (packing is exact per sample)."""
    first = samples[:6]
    alone = torch.stack([loss_of_sample(model, s, pixels[i:i + 1]) for i, s in enumerate(first)])
    packed, sample_of_token = pack_batch(collate(first, pixels[:6]), capacity=sum(len(ids) for ids, _ in first))
    with torch.no_grad():
        out = model(**packed)
    together = per_sample_loss(out.logits, next_token_targets(packed["labels"], out.logits_positions),
                               next_token_targets(sample_of_token, out.logits_positions).clamp(min=0), len(first))
    return float((together - alone).abs().max())


@torch.no_grad()
def loss_of_sample(model: MultimodalModel, sample: tuple, pixels: torch.Tensor) -> torch.Tensor:
    ids, labels = sample
    return model(input_ids=ids[None], labels=labels[None], attention_mask=torch.ones_like(ids)[None],
                 pixel_values=pixels).loss


FULL = "plain, logits at every position"


def bench_packing(spec: Spec, n_samples: int, warmup: int, repeats: int) -> dict:
    """[4]: real tokens per second of one pass over length-skewed data, per arrangement of the batches."""
    model = cornstarch_from_llava(build_llava(spec, "full")).train()
    samples = skewed_samples(spec, n_samples)
    pixels = torch.randn(n_samples, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    tokens = sum(len(ids) for ids, _ in samples)
    plans = arrangements(spec, samples, pixels)
    optimizer = adamw(model)

    def one_pass(batches: list[dict], supervised_only: bool = True) -> Callable[[], None]:
        def run() -> None:
            model.supervised_logits_only = supervised_only
            for batch in batches:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            model.supervised_logits_only = True
        return run

    passes = {name: one_pass(b) for name, b in plans.items()}
    passes[FULL] = one_pass(plans["plain"], supervised_only=False)  # logits everywhere, as transformers does
    plans[FULL] = plans["plain"]
    ms, busy = interleaved_median_ms(passes, warmup, repeats)
    slots = {name: sum(b["input_ids"].numel() for b in batches) for name, batches in plans.items()}
    counts = {name: pass_flops(model, batches) for name, batches in plans.items() if name != FULL}
    counts["alone"] = pass_flops(model, [collate([s], pixels[i:i + 1]) for i, s in enumerate(samples)])
    flops = {name: total for name, (total, _) in counts.items()}
    head = {name: head for name, (_, head) in counts.items()}
    supervised = sum(int((labels[1:] != IGNORE_INDEX).sum()) for _, labels in samples)  # tokens the head predicts
    return {"tokens": tokens, "supervised": supervised, "ms": ms, "slots": slots,
            "steps": {k: len(v) for k, v in plans.items()}, "flops": flops, "head_flops": head,
            "per_sample_dloss": check_per_sample_losses(model, samples, pixels), "busy": busy}


# torch's FLOP counter knows the accelerators' attention kernels; count the CPU one (dense, masked blocks included)
def _cpu_attention_flops(query: tuple, key: tuple, value: tuple, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out: tuple, query: tuple, key: tuple, value: tuple, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}


def pass_flops(model: MultimodalModel, batches: list[dict]) -> tuple[int, int]:
    """FLOPs of the forwards and backwards of ``batches`` (matmuls, attention, convolutions; no optimizer): all, and
    the LM head's share."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        for batch in batches:
            model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    head = counter.get_flop_counts().get(f"{type(model).__name__}.language_model.lm_head", {})
    return counter.get_total_flops(), sum(head.values())


def bench_chunked_loss(tokens: int, vocab: int, hidden: int, chunk: int, warmup: int, repeats: int) -> dict:
    """[5]: the LM head + cross-entropy of ``tokens`` supervised tokens, forward and backward: computed apart (the
    LM's head, then the loss on its logits) vs fused in chunks (``loss_chunk_size``). Time and peak memory."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden, requires_grad=True)  # the decoder's last hidden states at those tokens
    targets = torch.randint(vocab, (tokens,))

    def apart() -> torch.Tensor:
        return causal_lm_loss(head(states)[None], targets[None])

    def fused() -> torch.Tensor:
        return chunked_head_loss(states, head.weight, None, targets, chunk)[0]

    def step(loss_of: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss_of().backward()
            head.weight.grad = states.grad = None
        return run

    dloss = abs(apart().item() - fused().item())
    assert dloss <= LOSS_ATOL, f"fused loss differs by {dloss}"
    runs = {"apart": step(apart), f"fused, chunks of {chunk}": step(fused)}
    ms, busy = interleaved_median_ms(runs, warmup, repeats)
    return {"ms": ms, "peak": {name: peak_bytes(run) for name, run in runs.items()}, "dloss": dloss, "busy": busy}


# ----------------------------------------------------------------------------------------------- output
def flag(busy: float) -> str:
    return f"other CPU {busy:.0%}" + ("  WARNING: machine busy, rerun on an idle machine" if busy > BUSY_WARNING
                                       else "")


def print_vs_hf(title: str, row: dict, target: float) -> None:
    ms = row["ms"]
    print(f"{title}: |dloss| {row['dloss']:.1e}; {flag(row['busy'])}")
    peak = row.get("peak")
    header = f"    {'':<34}{'ms/step':>9}{'HF/cs':>8}" + (f"{'peak MB':>9}{'cs/HF':>7}" if peak else "")
    print(header)
    for name, value in ms.items():
        line = f"    {name:<34}{value:>9.1f}{ms['hf'] / value:>8.2f}"
        if peak:
            line += f"{peak[name] / MB:>9.1f}{peak[name] / peak['hf']:>7.2f}"
        print(line)
    print(f"    target: HF/cs >= {target}" + ("; peak cs/HF <= 0.7" if peak else ""))
    if peak:
        floor = row["floor"]
        print(f"    floor of any step that holds every gradient before optimizer.step() (parameters + gradients + "
              f"AdamW moments): {floor / MB:.1f} MB = {floor / peak['hf']:.3f} of HF's peak; below it only by "
              "freeing gradients during backward (in_backward)")


def print_feature_layer(r: dict) -> None:
    for mode, what in (("frozen", "forward"), ("trainable", "forward + backward")):
        e, s = r[mode]["encoder"], r[mode]["step"]
        print(f"    tower {mode:<9} vision encoder ({what}): all layers {e['computed']:.1f} ms, stop at -2 "
              f"{e['dropped']:.1f} ms -> {e['computed'] / e['dropped']:.2f}x; whole train step {s['computed']:.1f} -> "
              f"{s['dropped']:.1f} ms ({s['computed'] / s['dropped']:.2f}x)")
    print(f"    target >= 1.2 (encoder); |dloss| {r['dloss']:.1e}; {flag(r['busy'])}")


def print_packing(r: dict) -> None:
    print(f"    {r['tokens']} real tokens in {sum(1 for _ in r['ms'])} arrangements:")
    for name, ms in r["ms"].items():
        rate = r["tokens"] / (ms / 1e3)
        print(f"    {name:<34} {r['steps'][name]:>3} steps, real-token fraction {r['tokens'] / r['slots'][name]:.2f}, "
              f"{rate:>6.0f} tokens/s, {r['ms']['plain'] / ms:.2f}x plain, {r['ms'][FULL] / ms:.2f}x full-logits plain")
    print(f"    per-sample loss packed vs alone: max |d| {r['per_sample_dloss']:.1e} (within 1e-5: "
          f"{r['per_sample_dloss'] <= 1e-5}); {flag(r['busy'])}")
    flops = r["flops"]
    ceiling = flops["plain"] / flops["alone"]
    print("    model work (forward + backward FLOPs) of one pass: " + ", ".join(
        f"{name} {f / 1e9:.1f} G" for name, f in flops.items()))
    print(f"    ceiling: the samples run one by one, without padding, do {flops['alone'] / 1e9:.1f} GFLOP: no "
          f"arrangement of them does less, so removing padding can save at most plain/alone = {ceiling:.2f}x of "
          f"the model's work (packed saves {flops['plain'] / flops['packed']:.2f}x, grouped "
          f"{flops['plain'] / flops['grouped']:.2f}x; fewer optimizer steps save the rest)")
    head = r["head_flops"]
    rest = {name: flops[name] - head[name] for name in ("plain", "alone")}
    print(f"    the LM head (forward + backward at the {r['supervised']} supervised tokens) does "
          f"{head['plain'] / 1e9:.1f} GFLOP in every arrangement ({head['plain'] / flops['plain']:.0%} of plain); even if it cost nothing, "
          f"removing padding could save at most {rest['plain'] / rest['alone']:.2f}x")


def print_chunked_loss(r: dict) -> None:
    (apart, fused), peak = r["ms"].items(), r["peak"]
    for name, ms in r["ms"].items():
        print(f"    {name:<34}{ms:>9.1f} ms {peak[name] / MB:>9.1f} MB peak")
    print(f"    fused/apart: time {fused[1] / apart[1]:.2f}, peak memory {peak[fused[0]] / peak[apart[0]]:.2f} "
          f"(weight and its gradient included); |dloss| {r['dloss']:.1e}; {flag(r['busy'])}")


def cpu_name() -> str:
    """The CPU's model name and count, e.g. ``Intel(R) Xeon(R) Processor, 2 CPUs`` (``/proc/cpuinfo`` on Linux)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def fill_defaults(args: argparse.Namespace, **defaults: tuple[int, int]) -> None:
    """Set each option left unset to its ``(full, quick)`` default, by ``args.quick``."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def bench_spec(args: argparse.Namespace) -> Spec:
    """Set the run's threads (``args.threads``), quiet transformers, and return the model to measure: the small
    ``QUICK`` one with ``args.quick``, else the Llava-shaped one."""
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    return QUICK if args.quick else LLAVA_SHAPED


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4, 5], choices=[1, 2, 3, 4, 5])
    parser.add_argument("--repeats", type=int, help="timed rounds (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 3; quick 1)")
    parser.add_argument("--samples", type=int, default=32, help="samples of the skewed set in part 4")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model, few steps")
    args = parser.parse_args(argv)
    fill_defaults(args, repeats=(20, 3), warmup=(3, 1))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = bench_spec(args)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {tf.__version__}, threads {args.threads}, warmup {args.warmup}, "
          f"repeats {args.repeats}\nconfig: {spec.describe()}")
    if 1 in args.parts:
        print_vs_hf("[1] all trainable", bench_vs_hf(spec, False, args.warmup, args.repeats), 1.5)
    if 2 in args.parts:
        print_vs_hf("[2] vision tower frozen", bench_vs_hf(spec, True, args.warmup, args.repeats), 1.7)
    if 3 in args.parts:
        print("[3] Llava default selection (layer -2, CLS dropped): later layers dropped vs computed")
        print_feature_layer(bench_feature_layer(spec, args.warmup, args.repeats))
    if 4 in args.parts:
        print(f"[4] length-skewed data ({args.samples} samples, answers 4-200 tokens): tokens/s per arrangement")
        print_packing(bench_packing(spec, args.samples, max(1, args.warmup // 2), max(3, args.repeats // 2)))
    if 5 in args.parts:
        tokens, vocab, hidden, chunk = (256, 16_000, 64, 64) if args.quick else (1024, 128_256, 256, 256)
        llama3 = " (Llama 3's)" if vocab == 128_256 else ""
        print(f"[5] LM head + loss alone, {tokens} supervised tokens, vocab {vocab}{llama3}, hidden {hidden}: "
              "forward + backward")
        print_chunked_loss(bench_chunked_loss(tokens, vocab, hidden, chunk, max(1, args.warmup // 2),
                                              max(3, args.repeats // 4)))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
