"""Train-step benchmark: cornstarch ``MultimodalModel`` vs transformers ``LlavaForConditionalGeneration`` (CPU).

What is measured
----------------
1. **cornstarch vs HF Llava.** For each model size (CLIP-style vision tower + Llama-style LM, built from configs,
   random weights) a ``LlavaForConditionalGeneration`` and a cornstarch ``MultimodalModel`` holding *identical*
   weights are trained on the *identical* batch (4 samples, one image each, right-padded text of ``seq`` tokens).
   Feature selection is Llava's default (``vision_feature_layer=-2``, strategy ``"default"``: layer -2 without
   CLS); cornstarch uses the equivalent ``request_hidden_states`` / ``penultimate_layer_without_cls`` callbacks.
   Before timing, both losses are asserted equal within 1e-5. One step = forward + backward + ``AdamW.step()`` +
   ``zero_grad``. Steps of the two models alternate (A B, B A, …) so that drifts in machine speed hit both
   equally; after ``--warmup`` rounds, the median of ``--repeats`` steps per model is reported.
   Read ``cs/HF``: the cornstarch step time over HF's; <= 1.00 means cornstarch is no slower.

2. **cornstarch: frozen vs trainable vision encoder.** Same model twice (identical weights), once with
   ``train(encoders_mode={"vision": (False, True)}, llm_mode=True)`` (vision tower frozen, projector and LM
   trainable) and once fully trainable; each has an AdamW over its trainable parameters only. The configuration
   gives the vision tower a large share of compute (bigger images, more patches; printed in the output).
   Reported per mode: interleaved median step time, bytes saved for backward during one forward (unique
   storages packed by ``torch.autograd.graph.saved_tensors_hooks``, which includes parameters the graph keeps;
   the activations-only part is shown too) and bytes of gradients + AdamW state. Read ``trainable/frozen`` for
   time (target >= 1.3: the frozen encoder runs without autograd) and ``frozen/trainable`` for memory
   (lower is better).

Both parts also print ``other CPU``: the share of the machine's CPUs that *other* processes used while timing
(from ``/proc/stat``). Above 10% the timings are flagged: on a small machine a concurrent job makes the OpenMP
threads wait for each other and can slow a step by 10x or more, unevenly between A and B.

Run from the repository root: ``python bench/step_vs_hf_llava.py`` (``--quick`` for a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cornstarch.models.feature_selection import penultimate_layer_without_cls, request_hidden_states  # noqa: E402
from cornstarch.models.multimodal_language_model import (  # noqa: E402
    ModalEncoderModule,
    MultimodalModel,
    MultimodalProjector,
    MultimodalProjectorConfig,
)

BATCH = 4
PAD = 0
LOSS_ATOL = 1e-5
MB = 2**20
BUSY_WARNING = 0.10  # share of the CPUs used by other processes above which timings are flagged


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model size: a CLIP vision tower (``vision_*``) and a Llama LM (``lm_*``)."""

    name: str
    vision_hidden: int
    vision_layers: int
    lm_hidden: int
    lm_layers: int
    vocab: int
    image_size: int = 32
    patch: int = 8
    seq_len: int = 128

    @property
    def image_tokens(self) -> int:
        """Features per image: one per patch (Llava's default strategy drops CLS)."""
        return (self.image_size // self.patch) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1  # inside the LM vocabulary, as Llava needs

    def describe(self) -> str:
        return (f"vision {self.vision_layers}x{self.vision_hidden} on {self.image_size}px/{self.patch}px patches "
                f"({self.image_tokens} tokens/image), LM {self.lm_layers}x{self.lm_hidden}, vocab {self.vocab}, "
                f"batch {BATCH}, seq {self.seq_len}")


SIZES = {
    "tiny": Spec("tiny", vision_hidden=32, vision_layers=2, lm_hidden=64, lm_layers=2, vocab=1024),
    "small": Spec("small", vision_hidden=128, vision_layers=4, lm_hidden=192, lm_layers=4, vocab=2048),
    "medium": Spec("medium", vision_hidden=256, vision_layers=6, lm_hidden=384, lm_layers=7, vocab=2048, patch=4),
}
# Part 2: a vision-heavy model (64px images, 256 patches each) so that the tower is a large share of compute.
FROZEN_SPEC = Spec("vision-heavy", vision_hidden=256, vision_layers=6, lm_hidden=256, lm_layers=4, vocab=2048,
                   image_size=64, patch=4, seq_len=320)
FROZEN_SPEC_QUICK = dataclasses.replace(FROZEN_SPEC, name="vision-heavy (quick)", vision_hidden=64, lm_hidden=64,
                                        vision_layers=2, lm_layers=2, image_size=32, seq_len=128)


# ----------------------------------------------------------------------------------------------- models
def _heads(hidden: int) -> int:
    return max(2, hidden // 64)


def llava_config(spec: Spec) -> tf.LlavaConfig:
    vision = tf.CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=_heads(spec.vision_hidden),
        image_size=spec.image_size, patch_size=spec.patch,
    )
    text = tf.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.lm_hidden, intermediate_size=3 * spec.lm_hidden,
        num_hidden_layers=spec.lm_layers, num_attention_heads=_heads(spec.lm_hidden),
        max_position_embeddings=max(256, spec.seq_len), pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    return tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=spec.image_token_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu")


def build_llava(spec: Spec, seed: int = 0) -> tf.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(llava_config(spec))


def cornstarch_from_llava(llava: tf.LlavaForConditionalGeneration) -> MultimodalModel:
    """A ``MultimodalModel`` with copies of ``llava``'s weights and Llava's default feature selection."""
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
    encoder = ModalEncoderModule(clip, projector=projector, preprocess_callback=request_hidden_states,
                                 postprocess_module_callback=penultimate_layer_without_cls)
    mllm = MultimodalModel({"vision": encoder}, llama)
    mllm.set_modality_token_ids({"vision": config.image_token_id})
    return mllm


def n_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


# ----------------------------------------------------------------------------------------------- data
def make_batch(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """One image per sample, placeholders expanded; text lengths differ per sample (right padding).

    Returns ``input_ids``/``attention_mask``/``labels`` ``[BATCH, seq]`` and ``pixel_values`` ``[BATCH, 3, H, W]``.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((BATCH, spec.seq_len), PAD)
    n_text = spec.seq_len - spec.image_tokens - 8  # longest sample: 8 pad tokens
    assert n_text > 8, f"seq_len {spec.seq_len} too short for {spec.image_tokens} image tokens"
    for i in range(BATCH):
        text = torch.randint(3, spec.image_token_id, (n_text - 2 * i,), generator=g)  # [n_text_i]
        prefix = 4 + i
        row = torch.cat([text[:prefix], torch.full((spec.image_tokens,), spec.image_token_id), text[prefix:]])
        ids[i, : row.numel()] = row
    mask = (ids != PAD).long()
    labels = ids.masked_fill((mask == 0) | (ids == spec.image_token_id), -100)
    pixels = torch.randn(BATCH, 3, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


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
    """Share of all CPUs that *other* processes used since ``cpu_clock()`` returned ``since`` (NaN if unknown).

    Timings taken while it is high (another job running) are not trustworthy: with 2 OpenMP threads on 2 busy
    cores every parallel region waits for a descheduled thread.
    """
    now = cpu_clock()
    if since is None or now is None:
        return float("nan")
    wall, busy, own = (b - a for a, b in zip(since, now))
    return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def interleaved_median_ms(steps: dict[str, Callable[[], None]], warmup: int,
                          repeats: int) -> tuple[dict[str, float], float]:
    """Median ms per step of each callable, run in alternating order (ABAB… reversed every round).

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


def saved_for_backward_bytes(model: torch.nn.Module, batch: dict) -> tuple[int, int]:
    """Bytes of unique storages autograd saves during one forward: ``(all, excluding parameters)``."""
    storages: dict[int, int] = {}
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss  # keeps the graph (and its saved storages) alive while counting
    total = sum(storages.values())
    del loss
    return total, total - sum(n for ptr, n in storages.items() if ptr in param_ptrs)


def grad_and_adamw_bytes(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all ``.grad`` after one backward plus all AdamW state tensors after the step."""
    model(**batch).loss.backward()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    optimizer.zero_grad(set_to_none=True)
    return grads + state


# ----------------------------------------------------------------------------------------------- parts
def bench_vs_hf(spec: Spec, warmup: int, repeats: int) -> dict:
    llava = build_llava(spec).train()
    mllm = cornstarch_from_llava(llava).train()
    assert n_params(mllm) == n_params(llava), (n_params(mllm), n_params(llava))
    batch = make_batch(spec)
    hf_loss, cs_loss = loss_of(llava, batch), loss_of(mllm, batch)
    assert abs(hf_loss - cs_loss) <= LOSS_ATOL, f"{spec.name}: HF loss {hf_loss} != cornstarch loss {cs_loss}"
    ms, busy = interleaved_median_ms(
        {"hf": make_step(llava, batch, adamw(llava)), "cs": make_step(mllm, batch, adamw(mllm))}, warmup, repeats
    )
    return {"size": spec.name, "params": n_params(llava), "hf": ms["hf"], "cs": ms["cs"],
            "dloss": abs(hf_loss - cs_loss), "busy": busy}


def bench_frozen(spec: Spec, warmup: int, repeats: int) -> dict[str, dict]:
    trainable = cornstarch_from_llava(build_llava(spec))
    frozen = copy.deepcopy(trainable)
    trainable.train(encoders_mode={"vision": (True, True)}, llm_mode=True)
    frozen.train(encoders_mode={"vision": (False, True)}, llm_mode=True)
    batch = make_batch(spec)
    models = {"trainable": trainable, "frozen": frozen}
    optimizers = {name: adamw(m) for name, m in models.items()}
    ms, busy = interleaved_median_ms({name: make_step(m, batch, optimizers[name]) for name, m in models.items()},
                                     warmup, repeats)
    results = {}
    for name, model in models.items():
        saved, saved_acts = saved_for_backward_bytes(model, batch)
        results[name] = {"trainable_params": n_params(model, trainable_only=True), "ms": ms[name], "saved": saved,
                         "saved_acts": saved_acts, "grad_state": grad_and_adamw_bytes(model, batch, optimizers[name]),
                         "busy": busy}
    return results


# ----------------------------------------------------------------------------------------------- output
def warn_if_busy(busy: float) -> None:
    if busy > BUSY_WARNING:
        print(f"WARNING: other processes used {busy:.0%} of the CPUs while timing; rerun on an idle machine.")


def print_vs_hf(rows: list[dict]) -> None:
    print(f"{'size':<8}{'params':>12}{'HF ms/step':>12}{'cs ms/step':>12}{'cs/HF':>8}{'|dloss|':>10}{'other CPU':>11}")
    for r in rows:
        print(f"{r['size']:<8}{r['params']:>12,}{r['hf']:>12.1f}{r['cs']:>12.1f}{r['cs'] / r['hf']:>8.3f}"
              f"{r['dloss']:>10.1e}{r['busy']:>11.0%}")
    warn_if_busy(max(r["busy"] for r in rows))


def print_frozen(spec: Spec, results: dict[str, dict]) -> None:
    print(f"config: {spec.describe()}")
    print(f"{'vision':<10}{'trainable':>12}{'ms/step':>10}{'saved MB':>10}{'(acts MB)':>11}{'grad+AdamW MB':>15}")
    for name, r in results.items():
        print(f"{name:<10}{r['trainable_params']:>12,}{r['ms']:>10.1f}{r['saved'] / MB:>10.1f}"
              f"{r['saved_acts'] / MB:>11.1f}{r['grad_state'] / MB:>15.1f}")
    t, f = results["trainable"], results["frozen"]
    print(f"step time trainable/frozen: {t['ms'] / f['ms']:.2f}x (target >= 1.3); other processes used "
          f"{t['busy']:.0%} of the CPUs meanwhile")
    warn_if_busy(t["busy"])
    print(f"saved-for-backward frozen/trainable: {f['saved'] / t['saved']:.2f} "
          f"(activations only: {f['saved_acts'] / t['saved_acts']:.2f}); "
          f"grad+AdamW frozen/trainable: {f['grad_state'] / t['grad_state']:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), help="model sizes of part 1 (default: all; "
                        "quick: tiny)")
    parser.add_argument("--repeats", type=int, help="timed steps per model (default 30; quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 5; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny size, small part-2 model, few steps")
    args = parser.parse_args(argv)
    defaults = {"sizes": ["tiny"], "repeats": 3, "warmup": 1} if args.quick else \
        {"sizes": list(SIZES), "repeats": 30, "warmup": 5}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    start = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {tf.__version__}, threads {args.threads}, "
          f"warmup {args.warmup}, repeats {args.repeats}")

    print("\n[1] train step (fwd+bwd+AdamW), cornstarch MultimodalModel vs HF LlavaForConditionalGeneration")
    rows = []
    for name in args.sizes:
        rows.append(bench_vs_hf(SIZES[name], args.warmup, args.repeats))
        print(f"  {name}: {SIZES[name].describe()}; losses agree")
    print_vs_hf(rows)

    print("\n[2] cornstarch, vision encoder frozen vs trainable")
    spec = FROZEN_SPEC_QUICK if args.quick else FROZEN_SPEC
    print_frozen(spec, bench_frozen(spec, args.warmup, args.repeats))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
